#ifdef __CUDACC__
#define BIASMAP_HD __host__ __device__
#else
#define BIASMAP_HD
#endif
