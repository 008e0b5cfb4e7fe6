"""``personaplex client``: talk to a running server with a recording, as a live caller would.

The input (any format ``personaplex/audio.py`` reads, any sample rate or channels) is streamed to
``/api/chat`` as real Ogg/Opus at real-time pace (``chat_client.py``); the agent's audio and words
are saved as they arrive:

- the reply wav has the input's sample rate and exactly its number of samples: agent frame k answers
  user frame k, so sample i of the reply lies at sample i of the input's timeline (to within the
  server's tick phase, under 80 ms); silence where nothing arrived;
- the transcript JSON has every text piece with its time in seconds on that timeline, and the text.

Works against any server that speaks the reference protocol (kinds 0x00-0x02): the persona is always
sent, ``seed`` and the sampling parameters only when given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from .app.console import run_command
from .app.flags import DEFAULT_TEXT_PROMPT
from .chat_client import (
    DEFAULT_URL, ChatClientError, Delivery, Exchange, add_delivery_arguments, chat_url, client_ssl_context,
    run_exchange,
)
from .config import SAMPLE_RATE

TAIL_SECONDS = 3.0  # after the last frame: how long the last answers may take


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="personaplex client")
    parser.description = ("Stream a recording to a running server's /api/chat in real time (Ogg/Opus), as a live "
                          "caller would; save the agent's reply as a wav aligned with the input, and its words "
                          "with their times as JSON.")
    parser.epilog = ("example: personaplex client question.wav -o reply.wav --voice-prompt NATM1 "
                     "--url wss://gpu-box:8998/api/chat --insecure")
    parser.add_argument("input", type=Path, help="user audio: wav, flac, ogg or mp3, any sample rate and channels")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server's /api/chat WebSocket URL, ws:// or wss:// "
                        f"(default {DEFAULT_URL})")
    parser.add_argument("-o", "--output-wav", type=Path,
                        help="the agent's reply: the input's sample rate and length (default: <input>.reply.wav)")
    parser.add_argument("--output-text", type=Path,
                        help="the transcript JSON: text pieces with times, and the text (default: beside the reply)")
    persona = parser.add_argument_group("persona and sampling (sent as query parameters)")
    persona.add_argument("--text-prompt", default=DEFAULT_TEXT_PROMPT, help="role prompt text")
    persona.add_argument("--voice-prompt", default="NATF2.pt",
                         help="voice preset name, e.g. NATF2 or NATM1.pt (default NATF2.pt; see /api/voices)")
    persona.add_argument("--seed", type=int, help="random seed of the conversation (default: the server's)")
    persona.add_argument("--temp-text", type=float, help="text temperature (default: the server's)")
    persona.add_argument("--topk-text", type=int, help="text top-k (default: the server's)")
    persona.add_argument("--temp-audio", type=float, help="audio temperature (default: the server's)")
    persona.add_argument("--topk-audio", type=int, help="audio top-k (default: the server's)")
    connection = parser.add_argument_group("connection")
    connection.add_argument("--token", help="the server's auth token (its --auth-token)")
    connection.add_argument("--insecure", action="store_true",
                            help="wss://: accept a self-signed certificate (e.g. from 'personaplex serve --ssl DIR')")
    connection.add_argument("--no-realtime", action="store_true",
                            help="send without a local clock, as fast as the server takes audio (for tests: the "
                                 "server still answers one 80 ms frame per tick, so it takes about as long)")
    add_delivery_arguments(parser)
    return parser


def query_parameters(args: argparse.Namespace) -> dict[str, str | None]:
    def given(value) -> str | None:
        return None if value is None else str(value)

    return {
        "text_prompt": args.text_prompt, "voice_prompt": args.voice_prompt, "seed": given(args.seed),
        "text_temperature": given(args.temp_text), "text_topk": given(args.topk_text),
        "audio_temperature": given(args.temp_audio), "audio_topk": given(args.topk_audio),
    }


def reply_on_input_timeline(exchange: Exchange, rate: int, length: int) -> np.ndarray:
    """The agent's audio at ``rate`` with exactly ``length`` samples (frame 0 at sample 0; silence pads)."""
    from .audio import resample

    reply = resample(exchange.reply_audio(), SAMPLE_RATE, rate)[:length]
    return np.clip(np.pad(reply, (0, length - len(reply))), -1.0, 1.0).astype(np.float32)


def transcript(exchange: Exchange, duration: float) -> dict:
    return {
        "text": "".join(piece.text for piece in exchange.text).strip(),
        "pieces": [{"time": piece.seconds, "text": piece.text} for piece in exchange.text],
        "duration_seconds": round(duration, 3),
        "server": exchange.metadata,
    }


def summary(exchange: Exchange) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    join = "-" if exchange.join_seconds is None else f"{exchange.join_seconds:.2f} s"
    missing = max(0, exchange.sent_frames - exchange.frames)
    return (f"sent {exchange.sent_frames} frames, received {exchange.frames} ({missing} missing, "
            f"{exchange.late_frames} late); latency p50 {ms(exchange.percentile(50))}, "
            f"p90 {ms(exchange.percentile(90))}; join {join}; {len(exchange.text)} text pieces")


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .audio import audio_file_format, read_audio, split_frames

    url = chat_url(args.url, query_parameters(args), args.token)  # validates the URL first
    audio = read_audio(args.input)
    rate, length = audio_file_format(args.input)
    output_wav = args.output_wav or args.input.with_name(args.input.stem + ".reply.wav")
    output_text = args.output_text or output_wav.with_suffix(".json")
    for output in (output_wav, output_text):
        if not output.parent.is_dir():
            raise ChatClientError(f"cannot write {output}: folder {output.parent} does not exist")
    frames = split_frames(audio)
    duration = length / rate
    print(f"streaming {args.input} ({duration:.2f} s, {len(frames)} frames) to {args.url}", file=sys.stderr, flush=True)

    with tqdm(total=len(frames), unit="frame", desc="reply", file=sys.stderr, disable=None) as progress:
        def advance(exchange: Exchange) -> None:
            progress.update(min(exchange.frames, len(frames)) - progress.n)

        exchange = asyncio.run(run_exchange(
            url, list(frames), ssl_context=client_ssl_context(url, args.insecure), realtime=not args.no_realtime,
            tail_seconds=TAIL_SECONDS, keep_reply=True, on_frames=advance))

    started = exchange.join_seconds is not None
    if started:  # even a conversation cut short leaves a reply worth keeping
        import sphn

        sphn.write_wav(str(output_wav), reply_on_input_timeline(exchange, rate, length), rate)
        output_text.write_text(json.dumps(transcript(exchange, duration), indent=1, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    if exchange.error is not None:
        message = " ".join(exchange.error.split())  # one line, whatever the server wrote
        if exchange.error_from_server:
            message = f"the server ended the conversation: {message}"
        if started:
            message += f" (the reply so far is in {output_wav})"
        raise ChatClientError(message)
    print(summary(exchange), flush=True)
    print(f"wrote {output_wav} ({length / rate:.2f} s at {rate} Hz) and {output_text}", flush=True)
    delivery = Delivery(exchange.sent_frames, max(0, exchange.sent_frames - exchange.frames), exchange.late_frames)
    failure = delivery.warn_and_judge(args)
    if failure is not None:
        raise ChatClientError(f"the call did not come through whole ({failure})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
