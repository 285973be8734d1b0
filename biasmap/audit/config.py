"""The audit's YAML configuration, validated by pydantic, with `key=value` command-line overrides.

    config = load_config("configs/demo.yaml", ["steps=5", "axes.gender.concept=sex"])
    config.config_hash      # names the experiment in every result row's key

Every field is checked when the file is read, so a typo fails before any model loads: an unknown
field, a method or axis name outside the known ones, a bad seed range or a model folder that does
not exist each give an error naming the field and what it accepts (ConfigError).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import string
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..mitigation.methods import METHODS, NEGATIVE_PROMPTS, TRUE_CFG_BASES, needs_true_cfg
from ..models import PLANTED, RANDOM_MODELS, planted_weights_digest

# The paper's professions (Section 4.1).
PAPER_PROFESSIONS = (
    "architect",
    "artist",
    "athlete",
    "cashier",
    "chef",
    "doctor",
    "driver",
    "engineer",
    "firefighter",
    "journalist",
    "lawyer",
    "mechanic",
    "musician",
    "nurse",
    "officer",
    "pilot",
    "scientist",
    "teacher",
    "waiter",
    "worker",
)
# Axes the mitigation methods know: negative prompting and Fair Diffusion need per-axis prompts.
KNOWN_AXES = tuple(NEGATIVE_PROMPTS)
# The offline pipelines an audit runs: the planted world's trained model and every random-
# weight builder (SD1.x/2.x, SDXL, SD3 and Flux.1).
OFFLINE_MODELS = (PLANTED, *RANDOM_MODELS)
DEFAULT_CLASS_PROMPT = "a photo of the face of a {cls} person"
DType = Literal["fp32", "fp16", "bf16"]
Preset = Literal["paper", "official"]
DTYPES: tuple[str, ...] = get_args(DType)
PRESET_NAMES: tuple[str, ...] = get_args(Preset)
# The fields that change the row of a given key, so config_hash covers them (and only them).
HASHED_FIELDS = (
    "model",
    "dtype",
    "axes",
    "prompts",
    "q",
    "steps",
    "guidance",
    "preset",
    "map_size",
    "image_size",
    "clip_model",
)


class ConfigError(ValueError):
    """An audit configuration that cannot run; the message names each bad field."""


class _Strict(BaseModel):
    # Unknown fields are errors (a misspelt field would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_distinct(field: str, values: list) -> None:
    """A grid list names each entry once: a repeat would generate the same keys twice."""
    if len(set(values)) != len(values):
        raise ValueError(f"{field} repeat: {values}")


class AxisConfig(_Strict):
    """A demographic axis: the concept word appended to the attribution prompt, and the CLIP
    classes that label each image along it (class_prompts default to DEFAULT_CLASS_PROMPT).

    An intersectional axis names several concept words, all traced in one generation, and one
    class list per word; its CLIP classes are their product, named by joining one class of each
    word with a space ("female Asian"), so RD runs over those classes:

        gender+race:
          concept: [gender, race]
          classes: [[male, female], [white, black, Hispanic, Asian]]
    """

    concept: str | list[str]
    classes: list[str] | list[list[str]] = Field(min_length=2)
    class_prompts: list[str] | None = None

    @field_validator("concept")
    @classmethod
    def _concept_not_blank(cls, value: str | list[str]) -> str | list[str]:
        words = [value] if isinstance(value, str) else value
        if any(not word.strip() for word in words):
            raise ValueError("a concept word must not be empty")
        if isinstance(value, str):
            return value.strip()
        if len(value) < 2:
            raise ValueError(
                "a list of concept words makes an intersectional axis and needs at least two; "
                "give one word as text (concept: gender)"
            )
        _require_distinct("concept", [word.strip() for word in value])
        return [word.strip() for word in value]

    @model_validator(mode="after")
    def _classes_match_concepts(self) -> AxisConfig:
        nested = [isinstance(entry, list) for entry in self.classes]
        if isinstance(self.concept, str):
            if any(nested):
                raise ValueError(
                    "classes must be a list of class names for a one-word concept, e.g. "
                    "[male, female]; lists of lists are for a list of concept words"
                )
        elif not all(nested) or len(self.classes) != len(self.concept):
            raise ValueError(
                f"an intersectional axis needs one class list per concept word "
                f"({len(self.concept)}: {self.concept}), e.g. classes: [[male, female], "
                "[white, black, Hispanic, Asian]]"
            )
        elif any(len(entry) < 2 for entry in self.classes):
            raise ValueError("each concept word needs at least two classes")
        names = self.class_names()
        _require_distinct("classes", names)
        if self.class_prompts is not None and len(self.class_prompts) != len(names):
            raise ValueError(
                f"class_prompts needs one prompt per class ({len(names)}: {names}), got "
                f"{len(self.class_prompts)}"
            )
        return self

    @property
    def concepts(self) -> list[str]:
        """The concept words, in order: one, or several for an intersectional axis."""
        return [self.concept] if isinstance(self.concept, str) else list(self.concept)

    @property
    def intersectional(self) -> bool:
        return len(self.concepts) > 1

    def class_names(self) -> list[str]:
        """The CLIP classes: `classes`, or for an intersectional axis the product of its
        class lists, each named by its classes joined with a space (the first word's class
        varies slowest): [[male, female], [white, Asian]] -> male white, male Asian, ..."""
        if not self.intersectional:
            return list(self.classes)
        return [" ".join(names) for names in itertools.product(*self.classes)]

    def prompts_for_clip(self) -> list[str]:
        """The CLIP text prompt of each class, in the order of `class_names()`."""
        if self.class_prompts is not None:
            return list(self.class_prompts)
        return [DEFAULT_CLASS_PROMPT.format(cls=name) for name in self.class_names()]


def _default_axes() -> dict[str, AxisConfig]:
    return {
        "gender": AxisConfig(concept="gender", classes=["male", "female"]),
        "race": AxisConfig(concept="race", classes=["white", "black", "Hispanic", "Asian"]),
    }


class PromptTemplates(_Strict):
    """Prompt templates. generation and hard take {profession}; attribution takes {prompt}
    (the generation prompt actually used) and {concept} (the axis's concept word; an
    intersectional axis's words joined with " and ", e.g. "gender and race")."""

    generation: str = "A photo of the face of a {profession}"
    hard: str = "A photo of the face of a diverse {profession}"
    attribution: str = "{prompt} and {concept}"  # several words: "gender and race"

    @model_validator(mode="after")
    def _placeholders(self) -> PromptTemplates:
        expected = {
            "generation": {"profession"},
            "hard": {"profession"},
            "attribution": {"prompt", "concept"},
        }
        for name, wanted in expected.items():
            template = getattr(self, name)
            found = {field for _, field, _, _ in string.Formatter().parse(template) if field}
            if found != wanted:
                raise ValueError(
                    f"prompts.{name} must use exactly the placeholders "
                    f"{sorted('{' + w + '}' for w in wanted)}, got {template!r}"
                )
        return self


def parse_seeds(value: Any) -> list[int]:
    """Seeds from a list of ints, an int, or text: "0-99", "7", "0-3,10,20-22".

    Raises ValueError naming the accepted forms. Duplicates are an error (each seed is one key).
    """
    if isinstance(value, bool):
        raise ValueError(f"seeds must be a list of integers or a range like '0-99', got {value!r}")
    if isinstance(value, int):
        seeds = [value]
    elif isinstance(value, str):
        seeds = []
        for part in value.split(","):
            low, dash, high = part.strip().partition("-")
            try:
                first, last = int(low), int(high) if dash else int(low)
            except ValueError:
                raise ValueError(
                    f"seeds must be a list of integers or text like '0-99', '7' or "
                    f"'0-3,10'; cannot read {part.strip()!r} in {value!r}"
                ) from None
            if last < first:
                raise ValueError(
                    f"seed range {part.strip()!r} is empty: its end is before its start"
                )
            seeds.extend(range(first, last + 1))
    elif isinstance(value, list | tuple):
        seeds = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"seeds list must hold integers, got {item!r}")
            seeds.append(item)
    else:
        raise ValueError(f"seeds must be a list of integers or a range like '0-99', got {value!r}")
    if not seeds:
        raise ValueError("seeds is empty")
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be >= 0 (torch generator seeds), got {min(seeds)}")
    duplicates = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if duplicates:
        raise ValueError(f"seeds repeat {duplicates[:10]}; each seed is generated once")
    return seeds


def _looks_like_path(model: str) -> bool:
    # As load_pipeline decides: "org/name" is a hub id, "./x", "/x" and "~/x" are folders.
    return model.startswith((".", "/", "~"))


def check_methods(methods: list[str]) -> list[str]:
    """Raise ValueError unless every method is one of METHODS or `biasmap@<block>+<block>...`
    (guidance on the named blocks only; check_method_blocks checks the names against a model)."""
    unknown = [method for method in methods if method not in METHODS and not _block_method(method)]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; allowed: {list(METHODS)}, or biasmap@<block>+<block> "
            "with the model's block names"
        )
    return methods


def _block_method(method: str) -> bool:
    name, at, blocks = method.partition("@")
    return name == "biasmap" and bool(at) and all(blocks.split("+"))


def check_axis(axis: str) -> str:
    """Raise ValueError unless `axis` is a demographic axis the methods know (KNOWN_AXES), or
    an intersection of distinct ones joined with "+" ("gender+race")."""
    parts = axis.split("+")
    if any(part not in KNOWN_AXES for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown axis {axis!r}; allowed: {list(KNOWN_AXES)} or an intersection of them "
            "such as 'gender+race' (in a config, the concept word appended to the attribution "
            "prompt is the axis's 'concept' field, and may be any word)"
        )
    return axis


def check_model(value: str, offline: tuple[str, ...] = OFFLINE_MODELS) -> str:
    """Raise ValueError unless `value` is an offline model name, a diffusers pipeline folder
    or a hub id (which only loading can check). offline: the names the caller can run."""
    from ..models import ModelNotAvailableError, check_pipeline_folder

    if value in offline:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isdir(expanded):
        try:
            check_pipeline_folder(expanded)
        except ModelNotAvailableError as error:
            raise ValueError(str(error)) from None
    elif _looks_like_path(value):
        raise ValueError(
            f"model folder {value!r} does not exist; give an existing local folder (written "
            "by save_pretrained or huggingface-cli download), a hub id such as "
            f"'stable-diffusion-v1-5/stable-diffusion-v1-5', or one of {list(offline)}"
        )
    return value


def check_method_family(model: str, methods: list[str]) -> None:
    """Raise ValueError when a method needs what the model's family lacks: Fair Diffusion and
    negative prompting need a true CFG branch, which Flux.1 (guidance-distilled) has not.
    Read without loading weights; a model whose pipeline class only loading tells (a hub id
    not in the local cache) passes, and the sampler refuses such a method at its first batch."""
    from ..mitigation.adapters import adapter_class
    from ..models import pipeline_class_name, pipeline_family

    class_name = pipeline_class_name(model)
    adapter = adapter_class(class_name) if class_name is not None else None
    if adapter is None or adapter.has_true_cfg(class_name):
        return
    refused = [method for method in methods if needs_true_cfg(method)]
    if refused:
        accepted = [m for m in METHODS if not needs_true_cfg(m) and "@" not in m]
        raise ValueError(
            f"method(s) {refused} need a true classifier-free-guidance branch "
            f"({' and '.join(TRUE_CFG_BASES.values())}), which model {model!r} "
            f"({pipeline_family(class_name)}) has not; it accepts {accepted} and "
            "biasmap@<block>+<block> with its block names"
        )


def check_method_blocks(model: str, methods: list[str], image_size: int | None) -> None:
    """Raise ValueError when a `biasmap@...` method names a block the model lacks at this image
    size (None: the model's default). Models whose layout needs loading (hub ids) pass."""
    from ..discovery.trace import cross_attention_block_names
    from ..models import dit_block_names, unet_layout

    wanted = {method: method.partition("@")[2].split("+") for method in methods if "@" in method}
    if not wanted:
        return
    dit_names = dit_block_names(model)
    if dit_names is not None:
        # MM-DiT blocks do not depend on the image size.
        _check_blocks_exist(model, wanted, dit_names, "MM-DiT blocks")
        return
    layout = unet_layout(model)
    if layout is None:
        return
    unet, scale = layout
    side = unet.get("sample_size", 64)
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    if image_size is not None:
        height = width = image_size // scale
    names = cross_attention_block_names(unet, height, width)
    _check_blocks_exist(model, wanted, names, "cross-attention blocks at this image size")


def _check_blocks_exist(
    model: str, wanted: dict[str, list[str]], names: list[str], what: str
) -> None:
    for method, blocks in wanted.items():
        missing = [block for block in blocks if block not in names]
        if missing:
            raise ValueError(
                f"method {method!r} names block(s) {missing} that model {model!r} lacks; its "
                f"{what} are {names}"
            )


class AuditConfig(_Strict):
    """One audit: which model, which grid (professions x axes x seeds x methods x lambdas),
    how to generate, and where the results go. See configs/demo.yaml for a commented example."""

    # model
    model: str = "tiny"
    dtype: DType = "fp32"
    device: str = "cpu"
    # the grid
    professions: list[str] = Field(default_factory=lambda: list(PAPER_PROFESSIONS), min_length=1)
    axes: dict[str, AxisConfig] = Field(default_factory=_default_axes, min_length=1)
    prompts: PromptTemplates = Field(default_factory=PromptTemplates)
    seeds: list[int] = Field(default_factory=lambda: list(range(100)))
    methods: list[str] = Field(default_factory=lambda: ["sd", "biasmap"], min_length=1)
    lambdas: list[float] = Field(default_factory=lambda: [100.0], min_length=1)
    # generation
    q: float = Field(0.7, gt=0.0, lt=1.0)
    steps: int = Field(50, ge=1)
    guidance: float | None = None  # CFG scale; None takes the preset's (7.5 paper, 7.0 official)
    preset: Preset = "paper"
    map_size: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8)  # side in pixels; None: the model's default
    # classification and FID (used by biasmap.audit.clip / fid)
    clip_model: str | None = "openai/clip-vit-large-patch14"  # None: no CLIP labels
    fid_weights: str | None = None
    # execution: none of these change a row, so none is in config_hash
    output: str = "runs/audit"
    batch_size: int = Field(4, ge=1)
    executor: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)  # ray: default one per GPU, else 1
    threads: int | None = Field(None, ge=1)  # torch threads per worker; None: torch's default
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local cluster
    # Keep each image's attribution maps in its row (float16; `biasmap report --q` needs them).
    # Off saves the disk (about 110 KB per SD1.5 image); the stored metrics are the same.
    store_maps: bool = True
    # torch.compile the denoiser step (guided_generate's compile=): true (CUDA graphs on
    # CUDA), false, or a torch.compile mode name. Compiles once per worker and batch shape.
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list[int]:
        return parse_seeds(value)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        check_methods(value)
        _require_distinct("methods", value)
        return value

    @field_validator("axes")
    @classmethod
    def _axes(cls, value: dict[str, AxisConfig]) -> dict[str, AxisConfig]:
        for axis in value:
            check_axis(axis)
        return value

    @field_validator("professions")
    @classmethod
    def _professions(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("a profession is empty")
        _require_distinct("professions", value)
        return value

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, value: list[float]) -> list[float]:
        if any(not lam >= 0 for lam in value):
            raise ValueError(f"lambdas must be >= 0 (0 turns guidance off), got {value}")
        _require_distinct("lambdas", value)
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model(value)

    @model_validator(mode="after")
    def _fair_diffusion_has_one_axis(self) -> AuditConfig:
        # Fair Diffusion's edit prompts steer one axis ("a male" / "a female"); there are none
        # for an intersection.
        fair = [m for m in self.methods if m.partition("+")[0] == "fd"]
        joint = [name for name, axis in self.axes.items() if axis.intersectional]
        if fair and joint:
            raise ValueError(
                f"methods {fair} need a single axis, and axes {joint} are intersections; "
                "Fair Diffusion has edit prompts for one axis at a time"
            )
        return self

    @model_validator(mode="after")
    def _methods_fit_the_model(self) -> AuditConfig:
        # Before anything runs: a method the model's family cannot run, or a block list the
        # model lacks, would fail only at its first batch.
        check_method_family(self.model, self.methods)
        check_method_blocks(self.model, self.methods, self.image_size)
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import torch

        if value == "auto":
            return value
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {value!r}"
            ) from None
        return value

    @field_validator("clip_model")
    @classmethod
    def _clip_model(cls, value: str | None) -> str | None:
        if (
            value is not None
            and _looks_like_path(value)
            and not os.path.isdir(os.path.expanduser(value))
        ):
            raise ValueError(
                f"CLIP model folder {value!r} does not exist; give an existing folder, a hub id "
                "such as 'openai/clip-vit-large-patch14', 'tiny' (random weights) or null (no "
                "CLIP labels)"
            )
        return value

    @field_validator("fid_weights")
    @classmethod
    def _fid_weights(cls, value: str | None) -> str | None:
        if value is not None and not os.path.exists(os.path.expanduser(value)):
            raise ValueError(f"fid_weights path {value!r} does not exist")
        return value

    # ----------------------------------------------------------------- derived values

    @property
    def config_hash(self) -> str:
        """A 12-hex-digit digest of every field that changes the row of a given key.

        Left out: the grid itself (professions, seeds, methods, lambdas and which axes are in it:
        they are in the key, so a run can be extended with more of them and resumed), and what
        only changes where or how the work runs (output, batch_size, executor, workers, threads,
        ray_address, device, fid_weights, store_maps, compile). device, batch_size and compile
        can change the last bits of floating-point results, not what the experiment is.
        """
        identity = self.model_dump(include=set(HASHED_FIELDS))
        if PLANTED in (self.model, self.clip_model):
            # "planted" names whatever weights this checkout ships; a retrained model is
            # another experiment.
            identity["planted_weights"] = planted_weights_digest()
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def resolved_device(self) -> str:
        """The device to run on: 'auto' is cuda when torch sees a GPU, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides to a raw (unvalidated) config mapping, returning a new one.

    key may be dotted to reach into mappings (axes.gender.concept=sex). value is read as YAML,
    so `steps=5`, `methods=[sd,fd]` and `guidance=null` get their types; seeds=0-9 stays text.
    """
    result = json.loads(json.dumps(raw))  # a deep copy of plain YAML data
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value (dotted keys ok)")
        value = yaml.safe_load(text) if text.strip() else ""
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is not a mapping")
            node = child
        node[parts[-1]] = value
    return result


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field; allowed here: {_allowed_fields(item['loc'])}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _allowed_fields(location: tuple) -> list[str]:
    """The field names accepted where an unknown field was found."""
    parents = [str(part) for part in location[:-1]]
    model: type[BaseModel] = AuditConfig
    if parents[:1] == ["prompts"]:
        model = PromptTemplates
    elif parents[:1] == ["axes"] and len(parents) >= 2:
        model = AxisConfig
    return list(model.model_fields)


def validate_config(raw: dict[str, Any], source: str = "config") -> AuditConfig:
    """Validate a raw mapping; raises ConfigError listing every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return AuditConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid audit config {source}:\n{_describe(error)}") from None


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a syntax error or an empty file is a ConfigError naming the
    file (and the line), since an empty config would silently run the whole default grid."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise ConfigError(
            f"{path}: the config file is empty; give at least the fields that differ from the "
            "defaults (see configs/demo.yaml)"
        )
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> AuditConfig:
    """Read a YAML config (None: all defaults), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping, got {type(raw).__name__}")
    overrides = overrides or []
    # A dotted override into a mapping the file leaves at its default (axes.gender.concept=x)
    # edits that default rather than replacing the whole mapping with one field.
    defaults = None
    for override in overrides:
        top, dot, _ = override.partition("=")[0].strip().partition(".")
        if dot and top not in raw and top in ("axes", "prompts"):
            defaults = defaults or AuditConfig().model_dump(mode="json")
            raw[top] = defaults[top]
    return validate_config(apply_overrides(raw, overrides), str(path or "defaults"))
