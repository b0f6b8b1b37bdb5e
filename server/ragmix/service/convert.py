"""Protobuf <-> engine types. Servicers only translate; the engine never sees a message.

Requests are copied field for field and not judged here: proto uint32/uint64 fields arrive as
Python ints up to 2^32 - 1 / 2^64 - 1, float fields as the float32 value widened to a Python float
(NaN and +-inf included), an unset `optional` field as None. Every range check lives in the params'
`verify` (a ValidationError naming the field, mapped to INVALID_ARGUMENT). The one thing decided
here is the mixture enum: proto3 enums are open, so any int32 can arrive and an unknown one is a
ValidationError for the field `mixture` too. Nothing in the *_from_pb functions raises anything
else for a client's input.
"""

from __future__ import annotations

from ragmix.engine.outputs import DoneEvent, Event, PassagesEvent, RetrievedPassage, TokenEvent
from ragmix.engine.params import DecodingParams, Mixture, RetrievalParams
from ragmix.engine.score import MixtureScore, ScoreResult
from ragmix.errors import ValidationError
from ragmix_client.proto import ragmix_pb2 as pb


def mixture_from_pb(value: int) -> Mixture:
    """The Mixture of a proto enum value; UNSPECIFIED = TOKEN, anything unknown is refused."""
    if value == pb.MIXTURE_UNSPECIFIED:
        return Mixture.TOKEN
    try:
        return Mixture(value)
    except ValueError:
        raise ValidationError(
            "mixture",
            "mixture must be one of MIXTURE_TOKEN (1), MIXTURE_SEQUENCE (2), MIXTURE_CONCAT (3) "
            f"or MIXTURE_UNSPECIFIED (0), got enum value {value}.",
        ) from None


def retrieval_from_pb(
    msg: pb.GenerateRequest | pb.ScoreRequest | pb.RetrieveRequest,
) -> RetrievalParams:
    return RetrievalParams(
        query=msg.query,
        top_k=msg.top_k,
        retrieval_temperature=msg.retrieval_temperature,
        passage_ids=list(getattr(msg, "passage_ids", [])),
        nprobe=msg.nprobe,
        ef_search=msg.ef_search,
    )


def decoding_from_pb(msg: pb.DecodingParams) -> DecodingParams:
    return DecodingParams(
        max_new_tokens=msg.max_new_tokens,
        min_new_tokens=msg.min_new_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        num_beams=msg.num_beams,
        num_return_sequences=msg.num_return_sequences,
        top_n=msg.top_n,
        fast_sequence_decoding=msg.fast_sequence_decoding,
    )


def passage_to_pb(p: RetrievedPassage) -> pb.Passage:
    return pb.Passage(id=p.id, title=p.title, text=p.text, score=p.score, prior=p.prior)


def event_to_pb(ev: Event) -> pb.GenerateResponse:
    if isinstance(ev, TokenEvent):
        return pb.GenerateResponse(
            token=pb.Token(
                id=ev.id,
                text=ev.text,
                logprob=ev.logprob,
                responsibilities=ev.responsibilities,
                alternatives=[pb.Alternative(id=i, text=t, logprob=lp) for i, t, lp in ev.top],
            )
        )
    if isinstance(ev, PassagesEvent):
        return pb.GenerateResponse(
            passages=pb.Passages(passages=[passage_to_pb(p) for p in ev.passages])
        )
    if isinstance(ev, DoneEvent):
        t = ev.timings
        return pb.GenerateResponse(
            done=pb.Done(
                finish_reason=int(ev.finish_reason),
                text=ev.text,
                usage=pb.Usage(
                    prompt_tokens=ev.usage.prompt_tokens,
                    cached_prompt_tokens=ev.usage.cached_prompt_tokens,
                    generated_tokens=ev.usage.generated_tokens,
                ),
                timings=pb.Timings(
                    retrieval_ms=t.retrieval_ms,
                    prefill_ms=t.prefill_ms,
                    first_token_ms=t.first_token_ms,
                    total_ms=t.total_ms,
                    queue_ms=t.queue_ms,
                ),
                posterior=ev.posterior,
                sequences=[
                    pb.ScoredSequence(
                        text=c.text, token_ids=c.token_ids, logprob=c.logprob, posterior=c.posterior
                    )
                    for c in ev.sequences
                ],
            )
        )
    raise TypeError(f"unknown engine event {type(ev).__name__}")


def mixture_score_to_pb(m: MixtureScore) -> pb.MixtureScore:
    return pb.MixtureScore(
        logprob=float(m.logprob),
        token_logprobs=m.token_logprobs.tolist(),
        posterior=m.posterior.tolist(),
        responsibilities=m.responsibilities.ravel().tolist(),
    )


def score_to_pb(passages: list[RetrievedPassage], result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        passages=[passage_to_pb(p) for p in passages],
        answer_token_ids=result.answer_ids,
        token=mixture_score_to_pb(result.token),
        sequence=mixture_score_to_pb(result.sequence),
        concat=mixture_score_to_pb(result.concat),
    )
