from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("raw", "encoded", "format")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    raw: Tensor
    encoded: bytes
    format: str
    def __init__(self, raw: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[bytes] = ..., format: _Optional[str] = ...) -> None: ...

class EpisodeStart(_message.Message):
    __slots__ = ("instruction", "skill", "chunk_length", "client_info", "first_observation")
    class ClientInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SKILL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INFO_FIELD_NUMBER: _ClassVar[int]
    FIRST_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    skill: str
    chunk_length: int
    client_info: _containers.ScalarMap[str, str]
    first_observation: Observation
    def __init__(self, instruction: _Optional[str] = ..., skill: _Optional[str] = ..., chunk_length: _Optional[int] = ..., client_info: _Optional[_Mapping[str, str]] = ..., first_observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("step", "client_time", "state", "images")
    class ImagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Image
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    client_time: float
    state: Tensor
    images: _containers.MessageMap[str, Image]
    def __init__(self, step: _Optional[int] = ..., client_time: _Optional[float] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Mapping[str, Image]] = ...) -> None: ...

class EpisodeEnd(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class EpisodeRequest(_message.Message):
    __slots__ = ("start", "observation", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: EpisodeStart
    observation: Observation
    end: EpisodeEnd
    def __init__(self, start: _Optional[_Union[EpisodeStart, _Mapping]] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ..., end: _Optional[_Union[EpisodeEnd, _Mapping]] = ...) -> None: ...

class ImageSpec(_message.Message):
    __slots__ = ("height", "width", "channels")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class ActionSpec(_message.Message):
    __slots__ = ("action_dim", "chunk_length", "action_low", "action_high", "state_dim", "images", "normalization", "model")
    class ImagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ImageSpec
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ImageSpec, _Mapping]] = ...) -> None: ...
    class NormalizationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FloatList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FloatList, _Mapping]] = ...) -> None: ...
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    action_dim: int
    chunk_length: int
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    state_dim: int
    images: _containers.MessageMap[str, ImageSpec]
    normalization: _containers.MessageMap[str, FloatList]
    model: str
    def __init__(self, action_dim: _Optional[int] = ..., chunk_length: _Optional[int] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ..., state_dim: _Optional[int] = ..., images: _Optional[_Mapping[str, ImageSpec]] = ..., normalization: _Optional[_Mapping[str, FloatList]] = ..., model: _Optional[str] = ...) -> None: ...

class FloatList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("skill", "score")
    SKILL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    skill: str
    score: float
    def __init__(self, skill: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("skill", "confidence", "margin", "abstained", "candidates", "reason", "router")
    SKILL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    skill: str
    confidence: float
    margin: float
    abstained: bool
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    reason: str
    router: str
    def __init__(self, skill: _Optional[str] = ..., confidence: _Optional[float] = ..., margin: _Optional[float] = ..., abstained: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., reason: _Optional[str] = ..., router: _Optional[str] = ...) -> None: ...

class EpisodeStarted(_message.Message):
    __slots__ = ("episode_id", "skill", "core_only", "route", "spec", "state_version", "notes")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SKILL_FIELD_NUMBER: _ClassVar[int]
    CORE_ONLY_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    skill: str
    core_only: bool
    route: RouteDecision
    spec: ActionSpec
    state_version: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, episode_id: _Optional[str] = ..., skill: _Optional[str] = ..., core_only: _Optional[bool] = ..., route: _Optional[_Union[RouteDecision, _Mapping]] = ..., spec: _Optional[_Union[ActionSpec, _Mapping]] = ..., state_version: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class ActionChunk(_message.Message):
    __slots__ = ("step", "actions", "server_received_time", "server_done_time", "inference_ms", "notes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_RECEIVED_TIME_FIELD_NUMBER: _ClassVar[int]
    SERVER_DONE_TIME_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    actions: Tensor
    server_received_time: float
    server_done_time: float
    inference_ms: float
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., actions: _Optional[_Union[Tensor, _Mapping]] = ..., server_received_time: _Optional[float] = ..., server_done_time: _Optional[float] = ..., inference_ms: _Optional[float] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class EpisodeResponse(_message.Message):
    __slots__ = ("started", "chunk")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    started: EpisodeStarted
    chunk: ActionChunk
    def __init__(self, started: _Optional[_Union[EpisodeStarted, _Mapping]] = ..., chunk: _Optional[_Union[ActionChunk, _Mapping]] = ...) -> None: ...

class ListSkillsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SkillInfo(_message.Message):
    __slots__ = ("name", "instructions", "description", "order")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    instructions: _containers.RepeatedScalarFieldContainer[str]
    description: str
    order: int
    def __init__(self, name: _Optional[str] = ..., instructions: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., order: _Optional[int] = ...) -> None: ...

class ListSkillsResponse(_message.Message):
    __slots__ = ("skills", "state_version")
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    skills: _containers.RepeatedCompositeFieldContainer[SkillInfo]
    state_version: str
    def __init__(self, skills: _Optional[_Iterable[_Union[SkillInfo, _Mapping]]] = ..., state_version: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("instruction", "observation")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    observation: Observation
    def __init__(self, instruction: _Optional[str] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("server_version", "backend", "spec", "mode", "state_version", "num_skills", "uptime_s", "router", "extra", "state_loaded_time", "last_reload_error", "last_reload_time", "reloads_ok", "reloads_failed")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SKILLS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    STATE_LOADED_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    RELOADS_OK_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FAILED_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    backend: str
    spec: ActionSpec
    mode: str
    state_version: str
    num_skills: int
    uptime_s: float
    router: str
    extra: _containers.ScalarMap[str, str]
    state_loaded_time: float
    last_reload_error: str
    last_reload_time: float
    reloads_ok: int
    reloads_failed: int
    def __init__(self, server_version: _Optional[str] = ..., backend: _Optional[str] = ..., spec: _Optional[_Union[ActionSpec, _Mapping]] = ..., mode: _Optional[str] = ..., state_version: _Optional[str] = ..., num_skills: _Optional[int] = ..., uptime_s: _Optional[float] = ..., router: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ..., state_loaded_time: _Optional[float] = ..., last_reload_error: _Optional[str] = ..., last_reload_time: _Optional[float] = ..., reloads_ok: _Optional[int] = ..., reloads_failed: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("previous_version", "state_version", "changed")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    state_version: str
    changed: bool
    def __init__(self, previous_version: _Optional[str] = ..., state_version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...
