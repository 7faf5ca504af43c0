"""The Python pieces of a TRL GRPO script, as such a script writes them, for
configs/trl_callables.yaml: a tool (a function with type hints and a
Google-style docstring, from which its definition is read, as TRL reads
the functions given to GRPOTrainer(tools=...)), an environment class
(GRPOTrainer(environment_factory=...)) and reward functions (TRL's shape:
lists in, one float per completion out). Tandem runs them as they are, in
a python3 process of the learner's own.
"""

import re


def calculator(expression: str) -> str:
    """Adds and subtracts whole numbers.

    Args:
        expression: Whole numbers joined by + and -, e.g. "12+7-3".
    """
    if not re.fullmatch(r"\s*-?\d+(\s*[+-]\s*\d+)*\s*", expression):
        raise ValueError(f"not a sum of whole numbers: {expression!r}")
    terms = re.findall(r"[+-]?\s*\d+", expression)
    return str(sum(int(t.replace(" ", "")) for t in terms))


def _text(completion):
    # Conversational (the chat template made the prompt): a list of messages.
    return completion[-1]["content"] if isinstance(completion, list) else completion


def accuracy_reward(completions, answer, **kwargs):
    """1.0 when the completion's last number is the answer."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", _text(completion))
        rewards.append(1.0 if numbers and numbers[-1] == str(expected) else 0.0)
    return rewards


def tool_use_reward(completions, **kwargs):
    """0.1 for a completion that called the calculator."""
    return [0.1 if "<tool_call>" in _text(c) else 0.0 for c in completions]


class AnswerChecker:
    """An environment as GRPOTrainer(environment_factory=AnswerChecker)
    takes one: an instance per completion, reset with the row's columns
    before it is generated; its public methods are that completion's tools
    (but `get_reward`, its own reward, called once the completion is done),
    and reward functions may read its state (`environments`)."""

    def reset(self, answer, **kwargs):
        self.answer = str(answer)
        self.solved = False
        self.tries = 0
        return None

    def submit(self, answer: int) -> str:
        """Checks a final answer; three tries at most.

        Args:
            answer: The whole number you believe is the result.
        """
        if self.solved or self.tries >= 3:
            raise ValueError("No more tries.")
        self.tries += 1
        self.solved = str(answer) == self.answer
        return "correct" if self.solved else "wrong"

    def get_reward(self):
        """1.0 for a completion that submitted the right answer: TRL's
        environment-owned reward, logged as `AnswerChecker`."""
        return 1.0 if self.solved else 0.0
