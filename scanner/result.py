"""What a scan finds and measures, as typed data, and its JSON (the one place that knows the keys).

Detection (detect.py) fills Detection; verification (verify.py) fills Verification and each super
weight's and super activation's `effect` and `verdict`; scan.py puts both in a ScanResult with the
checkpoint's identity. The command line, the catalog, the crawl and the committed scans all take a
ScanResult; `to_json` and `from_json` are its only way in and out of JSON.
"""

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerPeak:
    """What one pass saw at one layer's MLP output projection (over all experts for MoE)."""

    layer: int
    max_input: float  # max |X| over tokens and channels
    input_channel: int
    input_token: int
    max_output: float  # max |Y|
    output_channel: int
    output_token: int
    expert: int | None = None  # the expert of the max output


@dataclass
class SuperWeight:
    """One super weight: W[out_channel, in_channel] of a layer's MLP output projection."""

    layer: int
    expert: int | None
    out_channel: int
    in_channel: int
    tensor: str  # the tensor as stored in the checkpoint file
    index: list[int]  # its position in that stored tensor
    hf_tensor: str  # the transformers parameter (Hugging Face layout)
    hf_index: list[int]  # its position in that parameter
    weight: float
    input_activation: float
    output_activation: float
    token: int
    spike_ratio: float
    input_ratio: float
    row_ratio: float
    share: float
    round: int = 1  # the pass that found it: 1 is the unmodified model; later passes find masked weights
    neuron: int = 0  # its super neuron: an index into Detection.super_neurons
    activation: int = 0  # its super activation: an index into Detection.super_activations
    verdict: str = "unverified"  # super, group, inert or unverified (scanner.verify)
    effect: dict | None = None  # what zeroing it alone does, with its control (None: not measured alone)


@dataclass
class SuperNeuron:
    """Super weights that read one intermediate channel: the same layer, expert and in_channel."""

    layer: int
    expert: int | None
    in_channel: int
    weights: list[int]  # indices into Detection.super_weights


@dataclass
class SuperActivation:
    """Super weights that write one residual channel (in one or several layers): one super activation."""

    channel: int  # the residual channel, the out_channel of its weights
    value: float  # its largest residual value h[t, channel] in the unmodified model, signed: how large it is
    token: int  # where: the prompt token ...
    layer: int  # ... and the decoder layer whose output holds it
    weights: list[int]  # indices into Detection.super_weights
    layers: list[int]  # the layers of its weights, ascending
    effect: dict | None = None  # what zeroing all its weights does, with their controls and whether it matters


@dataclass
class Detection:
    """Everything a scan found, in plain data."""

    super_weights: list[SuperWeight]
    layers: list[LayerPeak]
    rejected: list[dict] = field(default_factory=list)
    rounds: int = 0  # passes run: the masking depth + 1 (a last pass confirms that nothing is left)
    truncated: bool = False  # max_rounds ran out before a pass found nothing new
    super_neurons: list[SuperNeuron] = field(default_factory=list)
    super_activations: list[SuperActivation] = field(default_factory=list)


@dataclass
class Verification:
    """What zeroing the super weights did (scanner.verify), or why it was not measured (`skipped`)."""

    skipped: str | None = None  # the reason the model could not be verified; then no figure is set
    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    context: int = 0
    tokenizer: bool = False  # False: the text was read one hashed id per word
    prompts: list[str] = field(default_factory=list)
    expected: list[str] | None = None
    base_ppl: float | None = None
    base_expected_prob: float | None = None
    base_stopword_share: float | None = None
    joint_ppl_ratio: float | None = None
    joint_kl: float | None = None
    matters: float | None = None  # the verdicts' threshold on the perplexity ratio
    passes: int = 0
    copies: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skipped"}


@dataclass
class ScanResult:
    """One scanned checkpoint: what it is, what was found in it, and, if asked, what that does."""

    source: str  # as the user gave it
    repo_id: str | None  # the Hub id (an example's model too); None for a local folder or file
    revision: str  # the Hub commit sha, or a content hash
    artifact: str | None  # a Hub repo's GGUF file read; an example's file (not the repo's own weights)
    path: str  # where it was read
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    out_proj: list[str]
    dtype: str  # the weights' own precision (a GGUF quantization type too)
    compute_dtype: str
    device: str
    prompt: str
    tokens: list  # the prompt's tokens, or its ids without a tokenizer
    detection: Detection
    verification: Verification | None
    criteria: dict
    scanner_version: str
    scanned_at: str  # UTC, ISO 8601
    bytes_read: int  # tensor bytes loaded into the model, every pass counted
    seconds: float = 0.0
    download_seconds: float = 0.0  # resolving the source: a Hub download, when weights are downloaded
    remote: bool = False  # the weights were read from the Hub by range requests
    bytes_fetched: int | None = None  # bytes read from the source (disk or network): each byte once, if cached
    requests: int | None = None  # HTTP requests (remote) or range reads (local)
    passes: int | None = None  # streamed passes that fetched layers: 1 when the layers fit the cache
    forwards: int | None = None  # streamed passes over the layers, all told
    wait_seconds: float | None = None  # seconds the compute waited for bytes (network or disk)
    quantization: dict | None = None  # superweight quantize: scanner.quantize.quantize_lab's figures

    @property
    def name(self) -> str:
        """What the catalog calls it: the Hub id, else the resolved path (one name however it was typed)."""
        return self.repo_id or self.path or self.source

    @property
    def super_weights(self) -> list[SuperWeight]:
        return self.detection.super_weights

    @property
    def super_activations(self) -> list[SuperActivation]:
        return self.detection.super_activations

    def to_json(self) -> dict:
        """The documented JSON object of a scan (README "JSON output")."""
        identity = {name: getattr(self, name) for name in _IDENTITY}
        return {**identity, **asdict(self.detection),
                "verification": self.verification.to_json() if self.verification else None,
                "criteria": self.criteria, "scanner_version": self.scanner_version, "scanned_at": self.scanned_at,
                **{name: getattr(self, name) for name in _COSTS},
                **({"quantization": self.quantization} if self.quantization is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> "ScanResult":
        """A ScanResult from its JSON (a committed scan, a crawl worker's answer); unknown keys are ignored."""
        detection = Detection(
            super_weights=[SuperWeight(**_known(SuperWeight, w)) for w in data["super_weights"]],
            layers=[LayerPeak(**p) for p in data["layers"]], rejected=data.get("rejected", []),
            rounds=data.get("rounds", 0), truncated=data.get("truncated", False),
            super_neurons=[SuperNeuron(**n) for n in data.get("super_neurons", [])],
            super_activations=[SuperActivation(**_known(SuperActivation, a)) for a in data.get("super_activations", [])])
        verification = data.get("verification")
        return cls(**{name: data.get(name) for name in _IDENTITY}, detection=detection,
                   verification=Verification(**_known(Verification, verification)) if verification else None,
                   **{k: data.get(k) for k in ("criteria", "scanner_version", "scanned_at")},
                   **{k: data.get(k, getattr(cls, k, None)) for k in _COSTS}, quantization=data.get("quantization"))


# The identity fields of a ScanResult, in the order its JSON lists them.
_IDENTITY = ("source", "repo_id", "revision", "artifact", "path", "model_type", "architecture", "num_layers",
             "hidden_size", "out_proj", "dtype", "compute_dtype", "device", "prompt", "tokens")


# What a scan cost, in the order its JSON lists them.
_COSTS = ("bytes_read", "seconds", "download_seconds", "remote", "bytes_fetched", "requests", "passes", "forwards",
          "wait_seconds")


def _known(kind, data: dict) -> dict:
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in data.items() if k in names}
