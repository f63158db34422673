"""Inference request bodies, validated at the edge: every problem reported at once as VALIDATION_ERROR details.

Only the fields ScaiGrid documents are checked; any other field (response_format, presence_penalty, user, ...)
is passed to the backend untouched, as OpenAI clients expect. A JSON null counts as an absent field.
"""

from typing import Any

from scaigrid import errors
from scaigrid.errors import FieldError
from scaigrid.fields import INT32_MAX, INT64_MAX, INT64_MIN

CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")
ENCODING_FORMATS = ("float", "base64")
MAX_STOP_SEQUENCES = 4
# Bounds of the numbers forwarded upstream (docs/api.md): a value no backend could take is refused here, not there.
MAX_TOKENS_LIMIT = INT32_MAX  # and at most the model's max_output_tokens, which the pipeline caps it to
MAX_CHOICES = 128  # n
MAX_TOP_LOGPROBS = 20
MAX_DIMENSIONS = 65_536


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model(body: dict[str, Any], problems: list[FieldError]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        problems.append(FieldError("model", "required: the slug of a model (GET /v1/models lists them)"))


def _messages(messages: Any, problems: list[FieldError]) -> None:
    if not isinstance(messages, list) or not messages:
        problems.append(FieldError("messages", "required: a non-empty list of {role, content}"))
        return
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(FieldError(where, "must be an object {role, content}"))
            continue
        role = message.get("role")
        if role not in CHAT_ROLES:
            problems.append(FieldError(f"{where}.role", "one of: " + ", ".join(CHAT_ROLES)))
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools carries no content.
            if not (role == "assistant" and message.get("tool_calls")):
                problems.append(FieldError(f"{where}.content", "required: a string or a list of content parts"))
        elif isinstance(content, list):
            if not all(isinstance(part, dict) and isinstance(part.get("type"), str) for part in content):
                problems.append(FieldError(f"{where}.content", "content parts must be objects with a `type`"))
        elif not isinstance(content, str):
            problems.append(FieldError(f"{where}.content", "a string or a list of content parts"))
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            problems.append(FieldError(f"{where}.tool_call_id", "required for role tool: the id of the tool call"))


def _tools(tools: Any, problems: list[FieldError]) -> None:
    if not isinstance(tools, list):
        problems.append(FieldError("tools", "a list of {type: function, function: {name, ...}}"))
        return
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(FieldError(f"tools[{index}]", "must be {type: function, function: {name, ...}}"))


def _tool_choice(choice: Any, problems: list[FieldError]) -> None:
    if choice in TOOL_CHOICES:
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        problems.append(FieldError(
            "tool_choice", "none, auto, required, or {type: function, function: {name}}"))


def _stop(stop: Any, problems: list[FieldError]) -> None:
    if isinstance(stop, str):
        return
    if (not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOP_SEQUENCES
            or not all(isinstance(item, str) for item in stop)):
        problems.append(FieldError("stop", f"a string or a list of 1 to {MAX_STOP_SEQUENCES} strings"))


def _range(body: dict[str, Any], name: str, low: float, high: float, problems: list[FieldError]) -> None:
    value = body.get(name)
    if value is not None and not (_number(value) and low <= value <= high):
        problems.append(FieldError(name, f"a number from {low:g} to {high:g}"))


def _whole(body: dict[str, Any], name: str, low: int, high: int, problems: list[FieldError]) -> None:
    value = body.get(name)
    if value is not None and not (_integer(value) and low <= value <= high):
        problems.append(FieldError(name, f"an integer from {low} to {high}"))


def _typed(body: dict[str, Any], name: str, kind: type, what: str, problems: list[FieldError]) -> None:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        problems.append(FieldError(name, what))


def parameter_problems(body: dict[str, Any]) -> list[FieldError]:
    """The problems of the tuning parameters of a chat or embeddings body, or of a model's default_params (merged
    under every request's, so that a stored default must pass the same checks)."""
    problems: list[FieldError] = []
    _range(body, "temperature", 0, 2, problems)
    _range(body, "top_p", 0, 1, problems)
    _range(body, "presence_penalty", -2, 2, problems)
    _range(body, "frequency_penalty", -2, 2, problems)
    _whole(body, "max_tokens", 1, MAX_TOKENS_LIMIT, problems)
    _whole(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, problems)
    _whole(body, "n", 1, MAX_CHOICES, problems)
    _whole(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, problems)
    _whole(body, "seed", INT64_MIN, INT64_MAX, problems)
    _typed(body, "logprobs", bool, "true or false", problems)
    _whole(body, "dimensions", 1, MAX_DIMENSIONS, problems)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODING_FORMATS:
        problems.append(FieldError("encoding_format", "one of: " + ", ".join(ENCODING_FORMATS)))
    if body.get("stop") is not None:
        _stop(body["stop"], problems)
    return problems


def chat(body: dict[str, Any]) -> None:
    """Checks a chat completion body (native or OpenAI surface); raises VALIDATION_ERROR listing every problem."""
    problems: list[FieldError] = []
    _model(body, problems)
    _messages(body.get("messages"), problems)
    problems.extend(parameter_problems(body))
    _typed(body, "stream", bool, "true or false", problems)
    _typed(body, "stream_options", dict, "an object such as {include_usage: true}", problems)
    _typed(body, "metadata", dict, "an object of string values", problems)
    if body.get("tools") is not None:
        _tools(body["tools"], problems)
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], problems)
    if problems:
        raise errors.validation_error(problems)


def embed(body: dict[str, Any]) -> None:
    """Checks an embeddings body; raises VALIDATION_ERROR listing every problem."""
    problems: list[FieldError] = []
    _model(body, problems)
    given = body.get("input")
    if not (isinstance(given, str) and given) and not (
            isinstance(given, list) and given and all(isinstance(item, str) and item for item in given)):
        problems.append(FieldError("input", "required: a non-empty string or a non-empty list of non-empty strings"))
    problems.extend(parameter_problems(body))
    if problems:
        raise errors.validation_error(problems)


# --- images and audio (dispatch/media.py): OpenAI's bodies ---

IMAGE_RESPONSE_FORMATS = ("url", "b64_json")
MAX_IMAGES = 10  # n, as OpenAI allows
MAX_PROMPT_CHARS = 32_000
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_SPEECH_CHARS = 4096
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def _text(body: dict[str, Any], name: str, max_chars: int, problems: list[FieldError], *, required: bool) -> None:
    value = body.get(name)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value or len(value) > max_chars:
        problems.append(FieldError(name, ("required: " if value is None else "") + f"a string of 1 to {max_chars} "
                                   "characters"))


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...], problems: list[FieldError]) -> None:
    value = body.get(name)
    if value is not None and value not in choices:
        problems.append(FieldError(name, "one of: " + ", ".join(choices)))


def image(body: dict[str, Any]) -> None:
    """Checks an image generation body (POST /oai/v1/images/generations, /v1/inference/images/generate)."""
    problems: list[FieldError] = []
    _model(body, problems)
    _text(body, "prompt", MAX_PROMPT_CHARS, problems, required=True)
    _whole(body, "n", 1, MAX_IMAGES, problems)
    _choice(body, "response_format", IMAGE_RESPONSE_FORMATS, problems)
    for name in ("size", "quality", "style"):  # each model has its own values: the backend judges them
        _typed(body, name, str, "a string, such as 1024x1024, standard or vivid", problems)
    if problems:
        raise errors.validation_error(problems)


def speech(body: dict[str, Any]) -> None:
    """Checks a text-to-speech body (POST /oai/v1/audio/speech, /v1/inference/audio/synthesize)."""
    problems: list[FieldError] = []
    _model(body, problems)
    _text(body, "input", MAX_SPEECH_CHARS, problems, required=True)
    _text(body, "voice", 64, problems, required=True)
    _choice(body, "response_format", SPEECH_FORMATS, problems)
    _range(body, "speed", 0.25, 4, problems)
    if problems:
        raise errors.validation_error(problems)


def transcription(fields: dict[str, str], has_file: bool) -> None:
    """Checks the form fields of a transcription (multipart: every value is text)."""
    problems: list[FieldError] = []
    if not has_file:
        problems.append(FieldError("file", "required: the audio file, as a multipart file part"))
    _model(fields, problems)
    _choice(fields, "response_format", TRANSCRIPTION_FORMATS, problems)
    _text(fields, "language", 16, problems, required=False)
    temperature = fields.get("temperature")
    if temperature is not None:
        try:
            value = float(temperature)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1:
            problems.append(FieldError("temperature", "a number from 0 to 1"))
    if fields.get("stream") not in (None, "false"):
        problems.append(FieldError("stream", "streamed transcriptions are not relayed by this node"))
    if problems:
        raise errors.validation_error(problems)


GENERATE_FIELDS = ("model", "prompt", "max_tokens", "temperature", "stop", "seed")


def generate(body: dict[str, Any]) -> None:
    """Checks a text generation body (POST /v1/inference/generate): only its documented fields."""
    problems = [FieldError(name, f"unknown field; the fields are: {', '.join(GENERATE_FIELDS)}")
                for name in body if name not in GENERATE_FIELDS]
    _model(body, problems)
    _text(body, "prompt", 10_000_000, problems, required=True)
    problems.extend(parameter_problems(body))
    if problems:
        raise errors.validation_error(problems)
