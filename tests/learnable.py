"""Rewards for the learning test: tasks a tiny random model learns in seconds."""


def sevens(completion: str, gold: str) -> float:
    """The fraction of the completion's characters that are the digit 7 (0 for an empty completion).

    >>> sevens("7a77", "0")
    0.75
    """
    return completion.count("7") / len(completion) if completion else 0.0
