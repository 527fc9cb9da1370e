"""Named errors raised by the scanner; the CLI turns each into a one-line message."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ScanError(Exception):
    """Base class: a checkpoint could not be scanned, for a reason we can explain."""


class SourceNotFound(ScanError):
    """The local path or Hub repo does not exist, or does not name one checkpoint."""


class MissingConfig(ScanError):
    """The checkpoint has no usable config.json."""


class UnsafeCheckpoint(ScanError):
    """The checkpoint has no safetensors or GGUF weights, only formats we refuse to read (pickle)."""


class RemoteCodeRefused(ScanError):
    """The config needs custom code from the repo and --trust-remote-code was not given."""


class UnsupportedArchitecture(ScanError):
    """transformers does not know the architecture, or we cannot find its MLP output projection."""


class CorruptCheckpoint(ScanError):
    """A safetensors or GGUF file is truncated or unreadable, or its tensors disagree with the config."""


class UnsupportedQuantization(ScanError):
    """A GGUF tensor uses a quantization type the gguf package cannot dequantize."""


class HubError(ScanError):
    """The Hub could not give us the checkpoint (network, auth, missing revision)."""


class HubUnavailable(HubError):
    """The Hub answered 429 or 5xx, timed out, or could not be reached: worth trying again later."""


class ScanTimeout(ScanError):
    """The scan ran past its time limit."""


class DeviceUnavailable(ScanError):
    """The requested device does not exist on this machine."""


class InvalidPrompt(ScanError):
    """The prompt gives no tokens, or more than the model has positions for."""


class CannotVerify(ScanError):
    """The effect of zeroing cannot be measured on this model (no usable LM head, unknown logit scaling)."""


class NonFiniteActivation(ScanError):
    """A layer's activations hold NaN or infinite values: the checkpoint's weights or config are broken."""


class CannotWrite(ScanError):
    """A file the command was asked to write (a figure, a converted example) cannot be written there."""
