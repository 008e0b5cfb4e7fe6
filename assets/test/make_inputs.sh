#!/bin/sh
# Regenerates the synthetic user-side test recordings of this folder (needs espeak-ng and sox).
# Output: 24 kHz mono 16-bit WAV, user speech with pauses where the model is expected to answer.
# Deterministic: espeak-ng has no randomness and sox runs with dithering off (-D).
set -eu
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# say VOICE TEXT OUT: one utterance at 24 kHz mono 16-bit, leading and trailing silence cut.
say() {
    espeak-ng -v "$1" -s 165 -w "$work/raw.wav" "$2"
    sox -D "$work/raw.wav" -r 24000 -c 1 -b 16 "$3" \
        silence 1 0.02 0.1% reverse silence 1 0.02 0.1% reverse
}

# pause SECONDS OUT: digital silence.
pause() {
    sox -D -n -r 24000 -c 1 -b 16 "$2" trim 0 "$1"
}

# A user asking an assistant two questions, leaving room for the answers.
say en-us+f3 "Hi! Can you tell me why the sky is blue?" "$work/a1.wav"
say en-us+f3 "Oh, I see. And why are sunsets red and orange?" "$work/a2.wav"
say en-us+f3 "That is really interesting. Thank you!" "$work/a3.wav"
pause 1.0 "$work/start.wav"
pause 5.0 "$work/answer.wav"
pause 2.0 "$work/end.wav"
sox -D "$work/start.wav" "$work/a1.wav" "$work/answer.wav" "$work/a2.wav" "$work/answer.wav" "$work/a3.wav" \
    "$work/end.wav" input_assistant.wav gain -n -6

# A customer calling a service line: the agent greets first, then answers two questions.
say en-us+m3 "Hi, this is John Carter. When is my solar installation?" "$work/s1.wav"
say en-us+m3 "And how much will it cost?" "$work/s2.wav"
say en-us+m3 "Perfect. Thank you, bye!" "$work/s3.wav"
pause 2.5 "$work/greeting.wav"
pause 4.0 "$work/answer.wav"
pause 1.0 "$work/end.wav"
sox -D "$work/greeting.wav" "$work/s1.wav" "$work/answer.wav" "$work/s2.wav" "$work/answer.wav" "$work/s3.wav" \
    "$work/end.wav" input_service.wav gain -n -6

soxi input_assistant.wav input_service.wav
