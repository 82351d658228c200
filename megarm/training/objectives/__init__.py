"""Reward objectives beyond one Bradley-Terry pair (issue #28), one short module each."""
