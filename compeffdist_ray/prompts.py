"""The project's prompts, as chat messages (pure; no model).

Every prompt shows the exact answer format with a short example: small teachers follow an
example far better than a description, and large ones lose nothing by it.
"""

from __future__ import annotations

__all__ = [
    "attributes_messages",
    "task_messages",
    "answer_messages",
    "render_instruction",
    "instruction_with_demonstrations",
    "OUTPUT_STYLES",
]

SYSTEM = "You are an expert in sentiment analysis and opinion mining. Answer exactly in the format asked."

_ATTRIBUTES_Q = "List the sentiment-related attributes one could analyse in this text, one per line.\n\nText: {text}"

# Two worked turns before the real question: even a 135M teacher then answers in the same shape.
_ATTRIBUTE_SHOTS = (
    ("The pasta was cold but our waiter was lovely, and honestly the prices are a joke.",
     "- overall sentiment\n- food temperature\n- service friendliness\n- price complaint\n- sarcasm"),
    ("Just got my new headphones and the noise cancelling is unreal. Battery could be better though.",
     "- overall sentiment\n- noise cancelling\n- battery life\n- excitement"),
)


def attributes_messages(text: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for shot_text, shot_answer in _ATTRIBUTE_SHOTS:
        messages.append({"role": "user", "content": _ATTRIBUTES_Q.format(text=shot_text)})
        messages.append({"role": "assistant", "content": shot_answer})
    messages.append({"role": "user", "content": _ATTRIBUTES_Q.format(text=text)})
    return messages


# Task k of a perspective asks for the k-th style (cycling): tasks of one perspective then differ
# in what they ask for, not only in wording.
OUTPUT_STYLES = (
    "one label from a small set of labels that the instruction names",
    "a score from 1 to 5 with a short reason",
    "the words or phrases of the text that express it, as a list",
    "one or two sentences of explanation",
)

_TASK_Q = (
    'Invent one sentiment-analysis task about the perspective "{perspective}" (related attributes: '
    "{attributes}). The answer to the task must be {style}. Give its name, a one-sentence description, "
    "and the instruction a model follows for a user text."
)
_TASK_SHOT = (
    _TASK_Q.format(perspective="service quality", attributes="waiter attitude, wait time, staff friendliness",
                   style=OUTPUT_STYLES[0]),
    "Name: Service sentiment\nDescription: Judge how the writer feels about the service.\nInstruction: Read the "
    "text and decide whether the writer's opinion of the service is positive, negative or neutral. Answer with "
    "one label: positive, negative or neutral.",
)


def task_messages(perspective: str, attributes: list[str], index: int) -> list[dict[str, str]]:
    style = OUTPUT_STYLES[index % len(OUTPUT_STYLES)]
    attrs = ", ".join(attributes[:8]) if attributes else perspective
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _TASK_SHOT[0]},
        {"role": "assistant", "content": _TASK_SHOT[1]},
        {"role": "user", "content": _TASK_Q.format(perspective=perspective, attributes=attrs, style=style)},
    ]


def render_instruction(instruction: str, text: str) -> str:
    """The user turn that pairs a task's instruction with one user text (used everywhere)."""
    return f"{instruction.strip()}\n\nText: {text.strip()}"


def answer_messages(instruction: str, text: str) -> list[dict[str, str]]:
    """The teacher's prompt for answering one text under an instruction (demonstrations and
    responses alike, so both are written in the same conditions)."""
    system = "You are a careful annotator. Follow the instruction and answer briefly, in one or two lines."
    return [{"role": "system", "content": system}, {"role": "user", "content": render_instruction(instruction, text)}]


def instruction_with_demonstrations(instruction: str, demonstrations: list[dict], limit: int | None = None) -> str:
    """The task's instruction followed by its worked examples: the prompt shared by every text
    of the task (the teacher answers under it, the student is scored and trained under it)."""
    demos = list(demonstrations)[: limit if limit is not None else None]
    if not demos:
        return instruction.strip()
    shots = "\n\n".join(f"Text: {d['text'].strip()}\nAnswer: {d['output'].strip()}" for d in demos)
    return f"{instruction.strip()}\n\nExamples:\n\n{shots}"
