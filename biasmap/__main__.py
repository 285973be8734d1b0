from biasmap.cli import main

main()
