"""Tools and environments for the agent tests, written as TRL's documentation writes them (type hints, Google
docstrings), and a few that misbehave on purpose. Loaded by name (--tools agent_tools:multiply), as users load
theirs."""

import time


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def shout(text: str) -> str:
    """
    Repeats a text in capitals.

    Args:
        text: What to repeat.
    """
    return text.upper()


def explode(text: str) -> str:
    """
    Always raises.

    Args:
        text: Anything.
    """
    raise RuntimeError("the tool broke")


def sleepy(seconds: float) -> str:
    """
    Sleeps, then answers.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def objecty(text: str) -> str:
    """
    Returns something that is not text.

    Args:
        text: Anything.
    """
    return {"not": "text"}  # type: ignore[return-value]


def no_hints(a):
    """
    No type hints.

    Args:
        a: Anything.
    """
    return a


def no_docstring(a: int) -> int:
    return a


class Counter:
    """TRL's documented environment form: reset(**kwargs) per rollout, public methods are tools, get_reward scores
    the episode."""

    def reset(self, **kwargs) -> None:
        self.counter = 0
        return None

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter

    def get_reward(self) -> float:
        return float(self.counter)


class Greeter:
    """reset() returns text for the prompt, from the row's columns; different for each row of a group."""

    made = 0

    def __init__(self):
        Greeter.made += 1
        self.number = Greeter.made

    def reset(self, question: str = "") -> str:
        return f" (instance {self.number})"

    def wave(self, times: int) -> str:
        """
        Waves.

        Args:
            times: How many times.
        """
        return "o/ " * times


class NoReset:
    def act(self, x: int) -> int:
        """
        Acts.

        Args:
            x: A number.
        """
        return x


class BadReward(Counter):
    def get_reward(self) -> float:
        raise ValueError("cannot score")
