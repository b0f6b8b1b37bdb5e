from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mixture(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXTURE_UNSPECIFIED: _ClassVar[Mixture]
    MIXTURE_TOKEN: _ClassVar[Mixture]
    MIXTURE_SEQUENCE: _ClassVar[Mixture]
    MIXTURE_CONCAT: _ClassVar[Mixture]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
MIXTURE_UNSPECIFIED: Mixture
MIXTURE_TOKEN: Mixture
MIXTURE_SEQUENCE: Mixture
MIXTURE_CONCAT: Mixture
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason

class Passage(_message.Message):
    __slots__ = ("id", "title", "text", "score", "prior")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    score: float
    prior: float
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., prior: _Optional[float] = ...) -> None: ...

class DecodingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "num_beams", "fast_sequence_decoding", "top_n", "min_new_tokens", "num_return_sequences")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    FAST_SEQUENCE_DECODING_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    num_beams: int
    fast_sequence_decoding: bool
    top_n: int
    min_new_tokens: int
    num_return_sequences: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., num_beams: _Optional[int] = ..., fast_sequence_decoding: _Optional[bool] = ..., top_n: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., num_return_sequences: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("query", "top_k", "mixture", "decoding", "retrieval_temperature", "passage_ids", "nprobe", "ef_search")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    mixture: Mixture
    decoding: DecodingParams
    retrieval_temperature: float
    passage_ids: _containers.RepeatedScalarFieldContainer[str]
    nprobe: int
    ef_search: int
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., mixture: _Optional[_Union[Mixture, str]] = ..., decoding: _Optional[_Union[DecodingParams, _Mapping]] = ..., retrieval_temperature: _Optional[float] = ..., passage_ids: _Optional[_Iterable[str]] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("passages", "token", "done")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    passages: Passages
    token: Token
    done: Done
    def __init__(self, passages: _Optional[_Union[Passages, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class Passages(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob", "responsibilities", "alternatives")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RESPONSIBILITIES_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    responsibilities: _containers.RepeatedScalarFieldContainer[float]
    alternatives: _containers.RepeatedCompositeFieldContainer[Alternative]
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., responsibilities: _Optional[_Iterable[float]] = ..., alternatives: _Optional[_Iterable[_Union[Alternative, _Mapping]]] = ...) -> None: ...

class Alternative(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("finish_reason", "text", "usage", "timings", "posterior", "sequences")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    text: str
    usage: Usage
    timings: Timings
    posterior: _containers.RepeatedScalarFieldContainer[float]
    sequences: _containers.RepeatedCompositeFieldContainer[ScoredSequence]
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., posterior: _Optional[_Iterable[float]] = ..., sequences: _Optional[_Iterable[_Union[ScoredSequence, _Mapping]]] = ...) -> None: ...

class ScoredSequence(_message.Message):
    __slots__ = ("text", "token_ids", "logprob", "posterior")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprob: float
    posterior: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprob: _Optional[float] = ..., posterior: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_prompt_tokens", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("retrieval_ms", "prefill_ms", "first_token_ms", "total_ms", "queue_ms")
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    retrieval_ms: float
    prefill_ms: float
    first_token_ms: float
    total_ms: float
    queue_ms: float
    def __init__(self, retrieval_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query", "answer", "top_k", "passage_ids", "retrieval_temperature", "nprobe", "ef_search")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    query: str
    answer: str
    top_k: int
    passage_ids: _containers.RepeatedScalarFieldContainer[str]
    retrieval_temperature: float
    nprobe: int
    ef_search: int
    def __init__(self, query: _Optional[str] = ..., answer: _Optional[str] = ..., top_k: _Optional[int] = ..., passage_ids: _Optional[_Iterable[str]] = ..., retrieval_temperature: _Optional[float] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...

class MixtureScore(_message.Message):
    __slots__ = ("logprob", "token_logprobs", "posterior", "responsibilities")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    RESPONSIBILITIES_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    posterior: _containers.RepeatedScalarFieldContainer[float]
    responsibilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., posterior: _Optional[_Iterable[float]] = ..., responsibilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("passages", "answer_token_ids", "token", "sequence", "concat")
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONCAT_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    answer_token_ids: _containers.RepeatedScalarFieldContainer[int]
    token: MixtureScore
    sequence: MixtureScore
    concat: MixtureScore
    def __init__(self, passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ..., answer_token_ids: _Optional[_Iterable[int]] = ..., token: _Optional[_Union[MixtureScore, _Mapping]] = ..., sequence: _Optional[_Union[MixtureScore, _Mapping]] = ..., concat: _Optional[_Union[MixtureScore, _Mapping]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "top_k", "retrieval_temperature", "nprobe", "ef_search")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    retrieval_temperature: float
    nprobe: int
    ef_search: int
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., retrieval_temperature: _Optional[float] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "generator", "encoder", "passages", "max_top_k", "max_new_tokens", "max_query_chars", "default_top_k", "default_max_new_tokens", "index", "providers", "max_concurrent_requests", "max_queued_requests", "index_type", "replica", "device", "index_device", "generator_architecture", "passage_cache")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_CHARS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_CACHE_FIELD_NUMBER: _ClassVar[int]
    version: str
    generator: str
    encoder: str
    passages: int
    max_top_k: int
    max_new_tokens: int
    max_query_chars: int
    default_top_k: int
    default_max_new_tokens: int
    index: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_requests: int
    max_queued_requests: int
    index_type: str
    replica: str
    device: str
    index_device: str
    generator_architecture: str
    passage_cache: bool
    def __init__(self, version: _Optional[str] = ..., generator: _Optional[str] = ..., encoder: _Optional[str] = ..., passages: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_query_chars: _Optional[int] = ..., default_top_k: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., index: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., max_concurrent_requests: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., index_type: _Optional[str] = ..., replica: _Optional[str] = ..., device: _Optional[str] = ..., index_device: _Optional[str] = ..., generator_architecture: _Optional[str] = ..., passage_cache: _Optional[bool] = ...) -> None: ...

class NewPassage(_message.Message):
    __slots__ = ("id", "title", "text", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    source: str
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AddPassagesRequest(_message.Message):
    __slots__ = ("passages",)
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    passages: _containers.RepeatedCompositeFieldContainer[NewPassage]
    def __init__(self, passages: _Optional[_Iterable[_Union[NewPassage, _Mapping]]] = ...) -> None: ...

class AddPassagesResponse(_message.Message):
    __slots__ = ("ids", "passages", "sequence")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    passages: int
    sequence: int
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., passages: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class DeletePassagesRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeletePassagesResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "passages", "sequence")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    passages: int
    sequence: int
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., not_found: _Optional[_Iterable[str]] = ..., passages: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class IndexStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexStatsResponse(_message.Message):
    __slots__ = ("index", "index_type", "passages", "vectors", "built", "added", "deleted", "sequence", "snapshot_sequence", "writable", "max_batch_passages", "max_text_chars")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    BUILT_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    index: str
    index_type: str
    passages: int
    vectors: int
    built: int
    added: int
    deleted: int
    sequence: int
    snapshot_sequence: int
    writable: bool
    max_batch_passages: int
    max_text_chars: int
    def __init__(self, index: _Optional[str] = ..., index_type: _Optional[str] = ..., passages: _Optional[int] = ..., vectors: _Optional[int] = ..., built: _Optional[int] = ..., added: _Optional[int] = ..., deleted: _Optional[int] = ..., sequence: _Optional[int] = ..., snapshot_sequence: _Optional[int] = ..., writable: _Optional[bool] = ..., max_batch_passages: _Optional[int] = ..., max_text_chars: _Optional[int] = ...) -> None: ...
