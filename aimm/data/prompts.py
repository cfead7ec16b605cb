"""The release's classification prompt (spec section 9) and its inverse."""

from __future__ import annotations

from collections.abc import Sequence

#: Task (lower-case) -> instruction type.
TASK_TYPES: dict[str, str] = {
    "yelp": "SC", "amazon": "SC", "sst-2": "SC", "imdb": "SC",
    "dbpedia": "TC", "yahoo": "TC", "agnews": "TC",
    "mnli": "NLI", "rte": "NLI", "cb": "NLI",
    "qqp": "QQP",
    "wic": "WiC",
    "copa": "BoolQA", "boolqa": "BoolQA",
    "multirc": "MultiRC",
}

#: Instruction type -> instruction text (each ends with one space).
INSTRUCTIONS: dict[str, str] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
           "Choose one from the option. ",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
           "Choose one from the option. ",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option. ",
    "TC": "What is the topic of the following paragraph? Choose one from the option. ",
    "BoolQA": "According to the following passage, is the question true or false? "
              "Choose one from the option. ",
    "MultiRC": "According to the following passage and question, is the candidate answer true "
               "or false? Choose one from the option. ",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in "
           "both sentence? Choose one from the option. ",
}

OPTION_PREFIX = "Option: "
ANSWER_SUFFIX = "\nAnswer:"


def instruction_for(task: str) -> str:
    """Instruction text of a task (case-insensitive).

    Raises:
        KeyError: the task has no instruction type; the message lists the known tasks.
    """
    try:
        return INSTRUCTIONS[TASK_TYPES[task.lower()]]
    except KeyError:
        raise KeyError(
            f"no instruction for task {task!r}; known tasks: {', '.join(sorted(TASK_TYPES))}"
        ) from None


def build_prompt(task: str, labels: Sequence[str], sentence: str) -> str:
    """``<instruction>Option: <labels joined by ", ">.\\n<sentence>\\nAnswer:``.

    Labels keep the given (``labels.json``) order; ``sentence`` is used verbatim, so a
    sentence ending in a newline (agnews, dbpedia, yahoo, yelp, amazon) gives
    ``...\\n\\nAnswer:`` as in the release.
    """
    return f"{instruction_for(task)}{OPTION_PREFIX}{', '.join(labels)}.\n{sentence}{ANSWER_SUFFIX}"


def split_prompt(text: str) -> tuple[str, list[str], str]:
    """Inverse of :func:`build_prompt`: ``(instruction, labels, sentence)``.

    The labels run from the first ``"Option: "`` to the next ``".\\n"``; the sentence
    from there to the final ``"\\nAnswer:"``. Labels containing ``", "`` cannot be
    told apart (none of the release's do).

    Raises:
        ValueError: ``text`` is not in that format.
    """
    start = text.find(OPTION_PREFIX)
    end = text.find(".\n", start) if start >= 0 else -1
    if start < 0 or end < 0 or not text.endswith(ANSWER_SUFFIX):
        raise ValueError("not a release prompt ('<instruction>Option: <labels>.\\n<sentence>\\nAnswer:')")
    labels = text[start + len(OPTION_PREFIX):end].split(", ")
    return text[:start], labels, text[end + 2:len(text) - len(ANSWER_SUFFIX)]
