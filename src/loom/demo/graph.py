"""The existing social graph a launch copies from: users of an older app with
power-law follower counts and a few celebrities (deterministic for a seed).

Every new sign-up is an existing user bringing their follow graph along: whom they
follow (`following`) is copied into the new app; a celebrity signing up notifies
their followers (`followers`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

CELEBRITY_FOLLOWERS_SHARE = 0.3  # a celebrity is followed by this share of everyone


@dataclass(frozen=True, slots=True)
class LegacyGraph:
    users: int
    following: dict[int, tuple[int, ...]]  # user → whom they follow
    celebrities: tuple[int, ...]

    def followers(self, user: int) -> list[int]:
        return [u for u, followed in self.following.items() if user in followed]

    def edges(self) -> int:
        return sum(len(f) for f in self.following.values())


def generate(users: int, *, seed: int, celebrities: int = 3, follows_mean: int = 12) -> LegacyGraph:
    """`users` accounts; each follows ~`follows_mean` others picked with probability
    rising with their popularity (a Zipf-like law, so follower counts are power-law),
    and each celebrity is followed by a fixed share of everyone."""
    if not 2 <= users <= 1_000_000 or not 0 <= celebrities < users:
        raise ValueError("need 2 <= users <= 1000000 and 0 <= celebrities < users")
    rng = random.Random(seed)
    ids = list(range(users))
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(users)]
    stars = tuple(rng.sample(ids, celebrities))
    following: dict[int, tuple[int, ...]] = {}
    for user in ids:
        count = min(users - 1, max(1, int(rng.expovariate(1 / follows_mean))))
        picked = set(rng.choices(ids, weights=weights, k=count))
        picked.update(star for star in stars if rng.random() < CELEBRITY_FOLLOWERS_SHARE)
        picked.discard(user)
        following[user] = tuple(sorted(picked))
    return LegacyGraph(users=users, following=following, celebrities=stars)
