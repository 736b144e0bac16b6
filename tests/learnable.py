"""Rewards for the learning test: tasks a tiny random model learns in seconds."""


def sevens(completion: str, gold: str) -> float:
    """The fraction of the completion's characters that are the digit 7 (0 for an empty completion).

    >>> sevens("7a77", "0")
    0.75
    """
    return completion.count("7") / len(completion) if completion else 0.0


def sevens_dense(completion: str, gold: str) -> float:
    """sevens plus 0.01 per distinct character: groups practically never tie, so every step of the short
    multi-process tests carries a learning signal (a step where all groups tie skips its update).

    >>> round(sevens_dense("7a77", "0"), 2)
    0.77
    """
    return sevens(completion, gold) + 0.01 * len(set(completion))


def constant(completion: str, gold: str) -> float:
    """The same reward for everything: no group ever carries a signal."""
    return 1.0


def has_seven(completion: str, gold: str) -> float:
    """1 when the completion holds a '7', else 0: with 8 random tokens many groups tie (all 0), others do not.

    >>> has_seven("a7", "0"), has_seven("ab", "0")
    (1.0, 0.0)
    """
    return float("7" in completion)
