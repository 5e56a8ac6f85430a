"""The built-in text-retention set: 50 plain-text questions with short known answers.

Visual instruction tuning can erode what the base LLM knew; asking the tuned model and its base LLM the
same text-only questions measures how much is retained (`vistune eval ... --task text --base smollm2`).
Answers are matched after VQA normalisation: 'contains' (a reference appears as whole words in the
answer) for facts, 'exact' (the whole answer) for instructions such as "Reply with the word blue only".
"""

from __future__ import annotations

from vistune.data.records import Record, Turn

# (category, question, accepted answers, match mode)
QUESTIONS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("capital", "What is the capital of France?", ("Paris",), "contains"),
    ("capital", "What is the capital of Japan?", ("Tokyo",), "contains"),
    ("capital", "What is the capital of Italy?", ("Rome",), "contains"),
    ("capital", "What is the capital of Germany?", ("Berlin",), "contains"),
    ("capital", "What is the capital of Spain?", ("Madrid",), "contains"),
    ("capital", "What is the capital of the United Kingdom?", ("London",), "contains"),
    ("capital", "What is the capital of Russia?", ("Moscow",), "contains"),
    ("capital", "What is the capital of China?", ("Beijing",), "contains"),
    ("capital", "What is the capital of Egypt?", ("Cairo",), "contains"),
    ("capital", "What is the capital of Canada?", ("Ottawa",), "contains"),
    ("capital", "What is the capital of Greece?", ("Athens",), "contains"),
    ("capital", "What is the capital of Portugal?", ("Lisbon",), "contains"),
    ("fact", "How many days are there in a week?", ("7", "seven"), "contains"),
    ("fact", "How many legs does a spider have?", ("8", "eight"), "contains"),
    ("fact", "What color is the sky on a clear day?", ("blue",), "contains"),
    ("fact", "What is the largest planet in the solar system?", ("Jupiter",), "contains"),
    ("fact", "What is the chemical symbol for water?", ("H2O",), "contains"),
    ("fact", "Which planet is known as the Red Planet?", ("Mars",), "contains"),
    ("fact", "How many continents are there on Earth?", ("7", "seven"), "contains"),
    ("fact", "What is the freezing point of water in degrees Celsius?", ("0", "zero"), "contains"),
    ("fact", "Who wrote the play Romeo and Juliet?", ("Shakespeare", "William Shakespeare"), "contains"),
    ("fact", "What gas do plants absorb from the air?", ("carbon dioxide", "CO2"), "contains"),
    ("fact", "What is the opposite of hot?", ("cold",), "contains"),
    ("fact", "How many hours are there in a day?", ("24", "twenty-four"), "contains"),
    ("fact", "What is the first letter of the English alphabet?", ("A",), "contains"),
    ("fact", "Which animal is known as the king of the jungle?", ("lion",), "contains"),
    ("fact", "What do bees make?", ("honey",), "contains"),
    ("fact", "How many months are there in a year?", ("12", "twelve"), "contains"),
    ("arithmetic", "What is 2 + 2? Answer with a number.", ("4",), "contains"),
    ("arithmetic", "What is 3 + 5? Answer with a number.", ("8",), "contains"),
    ("arithmetic", "What is 10 - 3? Answer with a number.", ("7",), "contains"),
    ("arithmetic", "What is 6 times 7? Answer with a number.", ("42",), "contains"),
    ("arithmetic", "What is 9 + 10? Answer with a number.", ("19",), "contains"),
    ("arithmetic", "What is 100 divided by 4? Answer with a number.", ("25",), "contains"),
    ("arithmetic", "What is 12 - 5? Answer with a number.", ("7",), "contains"),
    ("arithmetic", "What is 5 times 5? Answer with a number.", ("25",), "contains"),
    ("arithmetic", "What is 15 + 15? Answer with a number.", ("30",), "contains"),
    ("arithmetic", "What is 8 times 3? Answer with a number.", ("24",), "contains"),
    ("instruction", "Reply with the word blue only.", ("blue",), "exact"),
    ("instruction", "Reply with the word yes only.", ("yes",), "exact"),
    ("instruction", "Reply with the number 7 only.", ("7",), "exact"),
    ("instruction", "Say the word hello and nothing else.", ("hello",), "exact"),
    ("instruction", "Repeat this word exactly: banana", ("banana",), "exact"),
    ("instruction", "Reply with the word green only.", ("green",), "exact"),
    ("instruction", "Answer with one word: what is the color of grass?", ("green",), "exact"),
    ("instruction", "Answer with one word: what animal says meow?", ("cat",), "exact"),
    ("instruction", "Reply with the word no only.", ("no",), "exact"),
    ("instruction", "Answer with a single number: how many sides does a triangle have?", ("3",), "exact"),
    ("instruction", "Spell the word dog backwards, with no other text.", ("god",), "exact"),
    ("instruction", "Answer with one word: what is frozen water called?", ("ice",), "exact"),
]


def text_records() -> list[Record]:
    """The built-in questions as Records (no images): meta holds answers, match mode and category."""
    return [
        Record(
            id=f"text-{i:02d}",
            images=[],
            turns=[Turn("user", question)],
            meta={"answers": list(answers), "match": mode, "question_type": category},
            source="vistune.eval.text_bench",
        )
        for i, (category, question, answers, mode) in enumerate(QUESTIONS)
    ]


def retention(model_metrics: dict, base_metrics: dict) -> dict:
    """Both accuracies and their ratio (tuned / base; None when the base answered nothing right)."""
    model_acc, base_acc = model_metrics["accuracy"], base_metrics["accuracy"]
    return {
        "model_accuracy": model_acc,
        "base_accuracy": base_acc,
        "retention": model_acc / base_acc if base_acc else None,
    }
