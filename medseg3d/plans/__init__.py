"""Planning: the versioned plans.json schema, pure planning rules, the memory model, the planner."""

from medseg3d.plans.schema import SCHEMA_VERSION, ConfigurationPlan, Plans

__all__ = ["SCHEMA_VERSION", "ConfigurationPlan", "Plans"]
