"""Writing files so that a reader (or a resumed run) never sees half of one."""
import os


def atomic_write(path: str, write, suffix: str = "") -> None:
    """Calls write(tmp) for a temporary file beside `path` (named with `suffix`
    last, for writers that go by the extension), flushes it to disk and
    renames it over `path`. The temporary file is removed if writing fails."""
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # name the file the caller asked for, not the temporary one
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def load_safetensors(path, device: str = "cpu") -> dict:
    """safetensors.torch.load_file(path), except that a damaged or hostile
    file is a ValueError naming it, in the words of the C++ reader
    (csrc/attnzoo/io/safetensors_index.cpp) where the fault is one it names:
    "<path>: header length ... runs past the end of the ...-byte file (truncated?)".
    A missing file stays the OSError it is (it names the path already)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        return load_file(path, device=device)
    except SafetensorError as error:
        raise ValueError(f"{path}: {_safetensors_fault(path, str(error))}") from error


def _safetensors_fault(path: str, detail: str) -> str:
    """What is wrong with a file safetensors refused: the C++ reader's
    diagnosis for the faults both check, else safetensors' own words."""
    import json
    import math

    detail = detail.replace("Error while deserializing header: ", "")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size < 8:
                return f"too short to be a safetensors file ({size} bytes)"
            if header_length > 100 << 20:
                return f"header length {header_length} exceeds the 100 MB limit"
            if header_length > size - 8:
                return f"header length {header_length} runs past the end of the {size}-byte file (truncated?)"
            header_text = f.read(header_length)
        try:
            header = json.loads(header_text)
        except ValueError:
            return f"malformed JSON header: {detail.replace('invalid JSON in header: ', '')}"
        data_size = size - 8 - header_length
        for name, info in sorted(header.items()):  # in the C++ reader's order
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if end > data_size:
                return f'tensor "{name}": data_offsets [{begin}, {end}] run outside the {data_size} data bytes'
            need = _DTYPE_BYTES[info["dtype"]] * math.prod(info["shape"])
            if end - begin != need:
                return (f'tensor "{name}": holds {end - begin} bytes but dtype "{info["dtype"]}" and shape '
                        f'{json.dumps(info["shape"], separators=(",", ":"))} need {need}')
    except (OSError, AttributeError, KeyError, TypeError, ValueError):
        pass  # a fault the C++ reader words differently
    return detail


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
