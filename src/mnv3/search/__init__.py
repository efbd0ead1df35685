"""Platform-aware architecture search: genomes of a space, MnasNet's reward, strategies as Optuna
samplers, accuracy oracles, and the search run that ties them to a latency source."""

from mnv3.search.genome import GenomeError, GenomeSpace
from mnv3.search.oracle import Oracle, ProxyOracle, search_splits
from mnv3.search.reward import Reward, RewardError
from mnv3.search.run import Search, SearchError
from mnv3.search.strategies import STRATEGIES, StrategyError, make_sampler

__all__ = ["STRATEGIES", "GenomeError", "GenomeSpace", "Oracle", "ProxyOracle", "Reward", "RewardError", "Search",
           "SearchError", "StrategyError", "make_sampler", "search_splits"]
