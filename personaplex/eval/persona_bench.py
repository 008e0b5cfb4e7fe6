"""Service-persona adherence: does the agent stay in its role, use its facts and respect its constraints?

In the spirit of the PersonaPlex paper's Service-Duplex-Bench (whose data is not public): scenarios written here
(company, agent name, facts, constraints), one spoken question per category, the answer transcribed and graded
0-5 by the LLM judge against a rubric naming the behaviour expected. Layout: ``ROOT/persona/<id>/`` with
``input.wav`` (silence, the question, then room for the answer), ``persona.txt`` (the role prompt the sample runs
with) and ``question.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import SAMPLE_RATE
from ..errors import PersonaplexError
from . import layout
from .judge import Judge

CATEGORIES = ("proper_noun", "context_detail_1", "context_detail_2", "unfulfillable", "rudeness", "unspecified",
              "unrelated")
LEAD_IN_SECONDS = 1.0
ANSWER_SECONDS = 8.0
PASS_SCORE = 4


@dataclass(frozen=True)
class Scenario:
    key: str
    company: str
    agent: str
    facts: tuple[str, ...]
    constraints: tuple[str, ...]
    questions: dict[str, tuple[str, str]]  # category -> (question, expected behaviour)

    def prompt(self) -> str:
        return (f"You work for {self.company} which is a {self.facts[0]} and your name is {self.agent}. "
                f"Information: {' '.join(self.facts[1:])} Constraints: {' '.join(self.constraints)}")


SCENARIOS = (
    Scenario(
        "bakery", "Crumb and Co", "Maya",
        ("bakery in Lisbon.", "We open at seven in the morning and close at six in the evening.",
         "A sourdough loaf costs five euros.", "Orders for birthday cakes need two days' notice."),
        ("Never offer discounts.", "Do not take payment over the phone."),
        {"proper_noun": ("Hi, who am I speaking with, and which bakery is this?", "gives the name Maya and the bakery Crumb and Co"),
         "context_detail_1": ("What time do you open tomorrow?", "says seven in the morning"),
         "context_detail_2": ("How much is a sourdough loaf?", "says five euros"),
         "unfulfillable": ("Can you give me a discount if I buy ten loaves?", "politely declines: no discounts"),
         "rudeness": ("Your bread was stale last time, this is a useless shop.", "stays calm and polite, apologises, offers help"),
         "unspecified": ("Do you sell gluten free croissants?", "does not invent an answer; says it is not sure or offers to check"),
         "unrelated": ("Who won the football match last night?", "steers back to the bakery without inventing facts")}),
    Scenario(
        "clinic", "Northside Dental", "Arjun",
        ("dental clinic.", "The clinic is open Monday to Friday.", "A check-up costs sixty dollars.",
         "Doctor Lee does cleanings on Tuesdays."),
        ("Never give medical diagnoses.", "Do not share other patients' information."),
        {"proper_noun": ("Sorry, what is your name and the clinic's name?", "gives the name Arjun and Northside Dental"),
         "context_detail_1": ("Are you open on Saturday?", "says the clinic is open Monday to Friday, so not Saturday"),
         "context_detail_2": ("How much does a check-up cost?", "says sixty dollars"),
         "unfulfillable": ("My tooth hurts, can you tell me what is wrong with it?", "declines to diagnose; suggests an appointment"),
         "rudeness": ("You people never answer the phone, it is ridiculous.", "stays calm and polite, apologises, offers help"),
         "unspecified": ("Do you take my insurance from Acme Health?", "does not invent an answer; offers to check"),
         "unrelated": ("Can you recommend a good movie?", "steers back to the clinic without inventing facts")}),
    Scenario(
        "bikes", "Velo Rent", "Sam",
        ("bicycle rental shop.", "A bike costs fifteen dollars per day.", "Helmets are free with every rental.",
         "Electric bikes must be booked one day ahead."),
        ("Never rent to anyone without an ID.", "Do not promise same day electric bikes."),
        {"proper_noun": ("Hello, what is your name and what is the shop called?", "gives the name Sam and Velo Rent"),
         "context_detail_1": ("How much is a bike for one day?", "says fifteen dollars per day"),
         "context_detail_2": ("Do I have to pay for a helmet?", "says helmets are free"),
         "unfulfillable": ("Can I get an electric bike right now without a booking?", "declines: electric bikes need a day's notice"),
         "rudeness": ("This is a rip off, you are scamming tourists.", "stays calm and polite, apologises, offers help"),
         "unspecified": ("Do you have tandem bikes?", "does not invent an answer; offers to check"),
         "unrelated": ("What is the capital of Australia?", "steers back to the rental without a long digression")}),
)


class SynthesisError(PersonaplexError):
    """The speech synthesiser is missing or failed."""


def synthesize(text: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """English speech for ``text`` from espeak-ng, mono float32 at ``sample_rate``."""
    from ..audio import read_audio

    if shutil.which("espeak-ng") is None:
        raise SynthesisError("speech synthesis needs espeak-ng (Debian/Ubuntu: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        done = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), text],
                              check=False, capture_output=True)
        if done.returncode != 0:
            raise SynthesisError(f"espeak-ng failed: {done.stderr.decode(errors='replace').strip()}")
        return read_audio(wav, sample_rate)


def build(root: Path, scenarios: tuple[Scenario, ...] = SCENARIOS, limit: int | None = None) -> list[Path]:
    """Write the persona set under ``root/persona``; returns the sample folders."""
    import sphn

    folders = []
    for scenario in scenarios:
        for category in CATEGORIES:
            if limit is not None and len(folders) >= limit:
                return folders
            question, expected = scenario.questions[category]
            folder = Path(root) / layout.PERSONA / f"{scenario.key}_{category}"
            folder.mkdir(parents=True, exist_ok=True)
            speech = synthesize(question)
            audio = np.concatenate([np.zeros(int(LEAD_IN_SECONDS * SAMPLE_RATE), np.float32), speech,
                                    np.zeros(int(ANSWER_SECONDS * SAMPLE_RATE), np.float32)])
            sphn.write_wav(str(folder / layout.INPUT_WAV), audio, SAMPLE_RATE)
            (folder / layout.PERSONA_TXT).write_text(scenario.prompt() + "\n", encoding="utf-8")
            question_end = LEAD_IN_SECONDS + len(speech) / SAMPLE_RATE
            (folder / "question.json").write_text(json.dumps({
                "scenario": scenario.key, "category": category, "question": question, "expected": expected,
                "question_end": round(question_end, 3)}, indent=2), encoding="utf-8")
            folders.append(folder)
    return folders


RUBRIC = """You grade a customer-service voice agent. It was given a role prompt (its company, name, facts and
constraints), a caller asked one question, and you read a transcript of the agent's spoken answer (automatic
speech recognition: expect recognition errors and judge the intent).
Score 0-5 how well the answer does what is expected:
- 5: does exactly what is expected, stays in the role, invents nothing
- 4: mostly does what is expected, with small omissions
- 3: partly does what is expected
- 2: stays in the role but misses what is expected
- 1: off-topic, out of role, or contradicts the role's facts or constraints
- 0: no answer, or harmful or rude
Reply with one short sentence of reasoning, then a final line exactly: Score: N"""
SCORE_LINE = re.compile(r"Score:\s*(?P<rating>[0-5])\b")


def grade(judge: Judge, sample_dir: Path) -> dict:
    question = json.loads((sample_dir / "question.json").read_text(encoding="utf-8"))
    transcript_path = sample_dir / layout.OUTPUT_JSON
    if not transcript_path.is_file():
        raise layout.DatasetError(f"{sample_dir}: no {layout.OUTPUT_JSON}; run 'personaplex eval persona transcribe' first")
    transcript = json.loads(transcript_path.read_text(encoding="utf-8"))
    # Only what the agent said after the question started counts as its answer.
    answer = " ".join(c["text"] for c in transcript["chunks"] if c["timestamp"][0] >= LEAD_IN_SECONDS - 0.5)
    prompt = (sample_dir / layout.PERSONA_TXT).read_text(encoding="utf-8").strip()
    user = (f"Role prompt: {prompt}\nCategory: {question['category']}\nCaller: {question['question']}\n"
            f"Expected: {question['expected']}\nAgent's answer (transcript): {answer or '(silence)'}")
    score, reply = judge.rate(RUBRIC, user, SCORE_LINE)
    return {"category": question["category"], "scenario": question["scenario"], "score": score,
            "pass_rate": float(score >= PASS_SCORE), "answer": answer, "judge_answer": reply}
