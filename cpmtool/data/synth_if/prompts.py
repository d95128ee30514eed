"""The prompts synth-if sends to a model. Our own wording of the UltraIF prompts
(kkk-an/UltraIF: UltraComposer/extract_constraint.py, generate_eval_ques.py,
Preprocessing/rejection_sampling.py), shortened so a small model's context and a CPU can afford them."""

from __future__ import annotations

CONSTRAINT_TYPES = ("content", "numerical", "stylistic", "format", "linguistic")

DECOMPOSE = """You extract the constraints of an instruction. A constraint is the smallest piece of the \
instruction that restricts what a good answer looks like. Constraint types:
- Content: terms or symbols that must appear, required elements, themes to cover.
- Numerical: how many items, sentences, paragraphs, examples or words.
- Stylistic: tone, style, words to use or avoid.
- Format: structure such as a list, JSON, bullet points, a table or a programming language.
- Linguistic: language or dialect, sentence forms, letter case, rhyme.

Ignore details that only describe the scenario. Write the basic query: the core task with every \
constraint removed. For each constraint also write the instruction with only that constraint \
removed (a fluent sentence). Leave out types without constraints.

If the instruction is not a request or has no constraints, answer only {{"Complex": false}}.
Otherwise answer only with JSON like this example.

Instruction: Write a short poem about autumn in exactly four lines, using simple words.
Answer: {{"Complex": true, "Basic Query": "Write a poem about autumn.", \
"Numerical Constraints": [{{"constraint": "exactly four lines", \
"simplified query": "Write a short poem about autumn using simple words."}}], \
"Stylistic Constraints": [{{"constraint": "use simple words", \
"simplified query": "Write a short poem about autumn in exactly four lines."}}]}}

Instruction: {query}
Answer:"""

EVAL_QUESTION = """A response was written for this instruction:
{query}

Write one yes/no question that a human evaluator could use to decide whether a response satisfies \
this constraint of the instruction, and only this one: "{constraint}".
Ask about the form directly (for example "Does the response use bullet points?"). If the constraint \
is meaningless or only describes the scenario, give an empty question.
Answer only with JSON: {{"question": "..."}}"""

JUDGE = """You check whether a response follows the constraints of a query.

[Query]
{query}

[Response]
{response}

[Questions]
{questions}
For every question, give a short explanation and a score, YES if the response satisfies it and NO \
if it does not. Answer only with JSON in this form:
{{"Question 1": {{"explanation": "...", "score": "YES"}}, "Question 2": {{"explanation": "...", "score": "NO"}}}}"""


def numbered(questions: list[str]) -> str:
    return "".join(f"{i}. {q}\n" for i, q in enumerate(questions, 1))
