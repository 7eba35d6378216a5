"""tpmflow for Parsl workflows: site configs that put the pool's replicas and the campaign's
simulations in one Parsl config, and ``@tpm_app``, a Parsl app that receives a pool client."""

from tpmflow.parsl.apps import tpm_app
from tpmflow.parsl.sites import ExecutorSpec, SiteConfig, build_parsl_config, load_site

__all__ = ["ExecutorSpec", "SiteConfig", "build_parsl_config", "load_site", "tpm_app"]
