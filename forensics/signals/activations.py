"""Activation-norm signal: the per-layer L2 norm of the residual stream over a text corpus.

The original analysis ran each model over The Pile's test set (1,000 batches x 8 sequences x 1,024 tokens) and
compared, layer by layer, the mean norm of the hidden state. Here that is `act_norm` (mean over tokens) and
`act_norm_std` (population std over tokens), each with `num_layers + 1` values: the embedding output (the input of
the first block) and the output of every block. The last value is the residual stream *before* the model's final
norm, which `output_hidden_states` would otherwise apply. The values are raw: the statistics stage z-scores every
signal's curve across layers the same way (forensics/stats/normalise.py), so activation and weight curves compare
alike.

Norms are taken with forward hooks and reduced per batch to (count, mean, M2) in float64 on the device, then merged
with Chan's formula: no hidden state outlives its batch. A model transformers cannot run (an ONNX graph, an
architecture it does not know) gives both signals with empty `values` and the reason under `unavailable`.

**Layer streaming** (`stream`), for a model larger than memory: transformers builds the model without its blocks
(embeddings and final norm loaded as usual), and each block is made, given its weights from the checkpoint
(safetensors, sharded or not: `sources.LayerTensors`), run and dropped as the forward pass reaches it. The windows
go through in batches as large as `STREAM_BUDGET` of activations allows (all of them in the CPU default), so each
block is read once per such batch and the peak memory is one block, the embeddings and one batch's activations,
whatever the depth. The curves are those of the full-model pass up to float rounding (tests/test_activations.py
compares them). `auto` streams a safetensors checkpoint when the model in its compute dtype would take more than
half the machine's memory (total, not free: the same machine always decides alike).
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import forensics.settings  # noqa: F401,I001  (first: the offline switches, before transformers is imported)

import torch  # noqa: E402
import transformers  # noqa: E402

from forensics.corpus import Corpus, Windows, load_corpus, progress_bar  # noqa: E402
from forensics.errors import ForensicsError  # noqa: E402
from forensics.progress import quiet_transformers  # noqa: E402
from forensics.sources.gguf import plain_reader  # noqa: E402
from forensics.signals.weights import Moments, pick_device  # noqa: E402
from forensics.sources import LayerTensors, NotRunnable, transformers_location  # noqa: E402

# The original's shapes on a GPU; on a CPU, a pass short enough for the demo case (about 10 s for a 135M model).
GPU_DEFAULTS = {"batch_size": 8, "seq_len": 1024, "num_batches": 1000}
CPU_DEFAULTS = {"batch_size": 4, "seq_len": 256, "num_batches": 8}
POSITIONS = "embedding output, then the output of each block (before any final norm)"
STREAM_BUDGET = 2 * 2**30  # bytes of activations per streamed batch: each such batch reads the blocks once more
STREAM_MODES = ("auto", "always", "never")


@dataclass
class Runnable:
    """A loaded model and what the activation pass needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    blocks: torch.nn.ModuleList
    dtype: torch.dtype
    max_positions: int | None
    streamed: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def devices(self) -> str:
        return ",".join(sorted({str(p.device) for p in self.model.parameters()}))

    def window_bytes(self, seq_len: int) -> int:
        """About what one window's activations take inside a block: a few hidden-sized tensors, the FFN's
        intermediate ones and one attention score matrix per head."""
        text = self.model.config.get_text_config()
        hidden = int(text.hidden_size)
        inner = int(getattr(text, "intermediate_size", None) or 4 * hidden)
        heads = int(getattr(text, "num_attention_heads", None) or 1)
        return seq_len * (6 * hidden + 3 * inner + heads * seq_len) * torch.finfo(self.dtype).bits // 8


def default_settings(device: str | torch.device | None = None) -> dict:
    return dict(GPU_DEFAULTS if pick_device(None if device is None else str(device)) == "cuda" else CPU_DEFAULTS)


def activation_signals(model_path: str | Path, corpus: Corpus | str | Path | None = None, *,
                       batch_size: int | None = None, seq_len: int | None = None, num_batches: int | None = None,
                       seed: int = 0, device: str | None = "auto", stream: str = "auto",
                       show_progress: bool = True) -> dict:
    """`{"act_norm": ..., "act_norm_std": ...}` for the model at `model_path` (docs/fingerprint-format.md).

    `corpus` is a loaded Corpus, a corpus file, or None for the embedded one. Unset sizes take the defaults for
    the device (GPU_DEFAULTS, CPU_DEFAULTS). The result is a pure function of the model's bytes, the corpus, the
    settings, the seed and the device's arithmetic (bf16 on a GPU, fp32 on a CPU).
    """
    defaults = default_settings(device)
    batch_size = batch_size or defaults["batch_size"]
    seq_len = seq_len or defaults["seq_len"]
    num_batches = num_batches or defaults["num_batches"]
    if min(batch_size, seq_len, num_batches) < 1:
        raise ValueError(f"batch_size, seq_len and num_batches must be positive: {batch_size}, {seq_len}, "
                         f"{num_batches}")
    settings = {"batch_size": batch_size, "seq_len": seq_len, "num_batches": num_batches, "seed": seed}
    if stream not in STREAM_MODES:
        raise ValueError(f"stream must be one of {STREAM_MODES}, not {stream!r}")
    try:
        runnable = load_streamed(model_path, device) if streams(model_path, stream, device) else \
            load_runnable(model_path, device)
    except NotRunnable as e:
        return _unavailable(str(e), settings)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, show_progress=show_progress)
    if runnable.max_positions and seq_len > runnable.max_positions:
        # An encoder such as BERT has 512 positions; record the cut rather than refuse the model.
        settings["requested_seq_len"] = seq_len
        settings["seq_len"] = seq_len = runnable.max_positions
    windows = corpus.sample_windows(runnable.tokenizer, num_windows=batch_size * num_batches, seq_len=seq_len,
                                    seed=seed, show_progress=show_progress)
    chunk = batch_size
    if runnable.streamed:
        chunk = max(1, min(windows.count, STREAM_BUDGET // runnable.window_bytes(windows.seq_len)))
    try:
        means, stds = norm_statistics(runnable, windows, chunk, model_path, show_progress=show_progress)
    except NotRunnable as e:  # a streamed block that does not load from the checkpoint
        return _unavailable(str(e), settings)
    meta = {"corpus": {"id": corpus.id, "sha256": corpus.sha256, "documents": len(corpus)},
            "windows": windows.describe(), "settings": settings, "positions": POSITIONS,
            "dtype": str(runnable.dtype).removeprefix("torch."), "device": runnable.devices,
            "tokens": windows.count * windows.seq_len, "streamed": runnable.streamed}
    return {"act_norm": {"kind": "activation_norm", "statistic": "mean", "values": means, **meta},
            "act_norm_std": {"kind": "activation_norm", "statistic": "std", "values": stds, **meta}}


def load_runnable(model_path: str | Path, device: str | None = "auto") -> Runnable:
    """The model as transformers runs it: bf16 on a GPU (device_map="auto", so a model larger than one GPU spreads
    over the others and the CPU), fp32 on a CPU. Raises NotRunnable with the reason when it cannot be run."""
    root, kw = transformers_location(model_path)
    dev = torch.device(pick_device(device))
    with quiet_transformers(), plain_reader():
        try:
            config = transformers.AutoConfig.from_pretrained(root, **kw)
        except (ValueError, KeyError, OSError) as e:
            # Never trust_remote_code: evidence may carry its own modeling code, and the tool does not run it.
            raise NotRunnable(f"transformers cannot build this architecture: {_first_line(e)}") from e
        if getattr(config, "is_encoder_decoder", False):
            raise NotRunnable(f"an encoder-decoder model ({config.model_type}): no single residual stream to measure")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(root, **kw)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise NotRunnable(f"no usable tokenizer: {_first_line(e)}") from e
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        try:
            model, info = transformers.AutoModel.from_pretrained(
                root, config=config, dtype=dtype, device_map="auto" if dev.type == "cuda" else None,
                output_loading_info=True, **kw)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise NotRunnable(f"transformers cannot load the weights: {_first_line(e)}") from e
    # A weight the checkpoint lacks would be left at its random initialisation; only the pooler is never used.
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    if missing:
        raise NotRunnable(f"{len(missing)} weight(s) missing from the checkpoint (first {missing[0]}); "
                          f"they would run with random values")
    if dev.type != "cuda":
        model.to(dev)
    model.eval()
    text = config.get_text_config()
    max_positions = getattr(text, "max_position_embeddings", None)
    return Runnable(model, tokenizer, find_blocks(model, int(text.num_hidden_layers)), dtype,
                    int(max_positions) if max_positions else None)


def streams(model_path: str | Path, stream: str, device: str | None) -> bool:
    """Whether the pass streams the blocks: `always`, `never`, or with `auto` when the checkpoint is safetensors and
    the model in the pass's dtype (4 bytes a weight on a CPU, 2 on a GPU) would take more than half the machine's
    memory (the GPU's on a GPU); the files' size, read as the 16-bit weights they mostly hold, says how much."""
    import psutil

    if stream != "auto":
        return stream == "always"
    try:
        root, kw = transformers_location(model_path)
    except NotRunnable:
        return False
    files = sorted(root.glob("*.safetensors")) if "gguf_file" not in kw else []
    if not files:
        return False  # only safetensors stream; anything else loads whole, as before
    stored = sum(f.stat().st_size for f in files)
    cuda = pick_device(device) == "cuda"
    need = stored * (1 if cuda else 2)
    have = torch.cuda.get_device_properties(0).total_memory if cuda else psutil.virtual_memory().total
    return need > have / 2


class StreamedBlock(torch.nn.Module):
    """A block whose weights are read from the checkpoint when the pass reaches it and dropped after."""

    def __init__(self, cls: type, config, index: int, tensors: LayerTensors, prefix: str, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self._spec = (cls, config, index, prefix, device, dtype)
        self._tensors = tensors
        # Attributes the model's forward reads from its blocks (e.g. attention_type) come from a weightless copy,
        # kept outside the module tree so that its meta tensors are not the model's.
        object.__setattr__(self, "_shell", self._build())

    def _build(self) -> torch.nn.Module:
        return _meta_block(*self._spec[:3])

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_shell"), name)

    def forward(self, *args, **kwargs):
        _, _, index, prefix, device, dtype = self._spec
        layer = self._build()
        state = self._tensors.block(prefix, dtype)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise NotRunnable(f"block {index} ({prefix}...) does not load from the checkpoint: "
                              f"{_first_line(e)}") from e
        if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):
            raise NotRunnable(f"block {index} holds a tensor the checkpoint does not give")
        layer.to(device).eval()
        return layer(*args, **kwargs)


def _meta_block(cls: type, config, index: int) -> torch.nn.Module:
    """Block `index` of class `cls`, its tensors on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return cls(config, layer_idx=index) if "layer_idx" in inspect.signature(cls.__init__).parameters else \
            cls(config)


def _weight_names(cls: type, config) -> set[str] | None:
    """The state-dict names of one block of `cls` (None if it cannot be built from the config alone)."""
    try:
        return set(_meta_block(cls, config, 0).state_dict())
    except (TypeError, ValueError, AttributeError):
        return None


def load_streamed(model_path: str | Path, device: str | None = "auto") -> Runnable:
    """The model without its blocks, which `StreamedBlock`s read one at a time (see the module's docstring)."""
    root, kw = transformers_location(model_path)
    if "gguf_file" in kw:
        raise NotRunnable("layer streaming reads safetensors checkpoints, not GGUF (transformers dequantises a GGUF "
                          "whole)")
    dev = torch.device(pick_device(device))
    tensors = LayerTensors(root)
    with quiet_transformers(), plain_reader():
        try:
            config = transformers.AutoConfig.from_pretrained(root, **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(root, **kw)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise NotRunnable(f"transformers cannot build this model: {_first_line(e)}") from e
        text = config.get_text_config()
        layers, layer_types = int(text.num_hidden_layers), getattr(text, "layer_types", None)
        shell = copy.deepcopy(config)
        shell.get_text_config().num_hidden_layers = 0
        if layer_types is not None:
            shell.get_text_config().layer_types = []
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        try:
            model, info = transformers.AutoModel.from_pretrained(root, config=shell, dtype="auto",
                                                                 output_loading_info=True, **kw)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise NotRunnable(f"transformers cannot load the model without its blocks: {_first_line(e)}") from e
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    if missing:
        raise NotRunnable(f"{len(missing)} weight(s) missing from the checkpoint (first {missing[0]})")
    # The token embedding stays as stored (a 152k x 3584 table is 2 GB more in float32) and its rows are widened as
    # they are looked up: widening 16-bit floats to float32 is exact, so the pass computes what a float32 model does.
    embedding = model.get_input_embeddings()
    kept = {id(p) for p in embedding.parameters()}
    for p in model.parameters():
        if id(p) not in kept:
            p.data = p.data.to(dtype)
    embedding.register_forward_hook(lambda module, args, output: output.to(dtype))
    model.config.get_text_config().num_hidden_layers = layers
    if layer_types is not None:
        model.config.get_text_config().layer_types = layer_types
    empty = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 0]
    if len(empty) != 1:
        raise NotRunnable(f"layer streaming cannot find the block stack of {type(model).__name__}")
    attr = empty[0][0]
    first = next((n for n in tensors.names() if f"{attr}.0." in n), None)
    if first is None:
        raise NotRunnable(f"the checkpoint has no tensor of block 0 (looked for '{attr}.0.')")
    prefix = first[:first.index(f"{attr}.0.")]
    block0 = {n[len(f"{prefix}{attr}.0."):] for n in tensors.names() if n.startswith(f"{prefix}{attr}.0.")}
    # The block class: of the classes transformers keeps whole on one device, the one whose weights are block 0's.
    module = sys.modules[type(model).__module__]
    text_config = model.config.get_text_config()
    classes = [getattr(module, n) for n in sorted(getattr(model, "_no_split_modules", None) or ()) if hasattr(module, n)]
    fitting = [c for c in classes if _weight_names(c, text_config) == block0]
    if len(fitting) != 1:
        raise NotRunnable(f"layer streaming cannot tell which class makes the blocks of {type(model).__name__}")
    cls = fitting[0]
    blocks = torch.nn.ModuleList([StreamedBlock(cls, text_config, i, tensors,
                                                f"{prefix}{attr}.{i}.", dev, dtype) for i in range(layers)])
    parent, _, leaf = attr.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, blocks)
    model.to(dev).eval()
    max_positions = getattr(text, "max_position_embeddings", None)
    return Runnable(model, tokenizer, blocks, dtype, int(max_positions) if max_positions else None, streamed=True)


def norm_statistics(runnable: Runnable, windows: Windows, batch_size: int, label: str | Path = "",
                    show_progress: bool = True) -> tuple[list[float], list[float]]:
    """Mean and population std over all tokens of the hidden state's L2 norm, at each of num_layers + 1 points."""
    rows = runnable.model.get_input_embeddings().num_embeddings
    top = int(windows.ids.max())
    if top >= rows:
        raise ForensicsError(label, f"the tokenizer gives token id {top} but the model's embedding has {rows} rows")
    parts: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(runnable.num_layers + 1)]

    def record(point: int, hidden: torch.Tensor) -> None:
        norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float64)
        mean = norms.mean()
        # kept on the device as tensors: reading them now would stall the GPU once per block
        parts[point].append((norms.numel(), mean, ((norms - mean) ** 2).sum()))

    def before_first(module, args, kwargs):
        record(0, args[0] if args else kwargs["hidden_states"])

    def after(point):
        def hook(module, args, output):
            record(point, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [runnable.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [block.register_forward_hook(after(i + 1)) for i, block in enumerate(runnable.blocks)]
    call = {"use_cache": False} if getattr(runnable.model.config, "use_cache", None) is not None else {}
    try:
        with torch.inference_mode(), progress_bar(show_progress) as bar:
            task = bar.add_task(f"activations {Path(label).name}", total=-(-windows.count // batch_size))
            for batch in windows.batches(batch_size):
                runnable.model(input_ids=torch.from_numpy(batch).to(runnable.input_device), **call)
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    means, stds = [], []
    for point in parts:
        m = Moments()
        for n, mean, m2 in point:
            m.merge(n, float(mean), float(m2))
        means.append(m.mean)
        stds.append(m.std)
    return means, stds


def find_blocks(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The stack of transformer blocks: a ModuleList of num_layers modules of one class (model.layers,
    transformer.h, encoder.layer, ...); if several qualify, the one holding the most parameters."""
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers
                  and len({type(c) for c in m}) == 1]
    if not candidates:
        raise NotRunnable(f"no stack of {num_layers} blocks found in {type(model).__name__}")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def _unavailable(reason: str, settings: dict) -> dict:
    entry = {"kind": "activation_norm", "values": [], "unavailable": reason, "settings": settings}
    return {"act_norm": {**entry, "statistic": "mean"}, "act_norm_std": {**entry, "statistic": "std"}}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
