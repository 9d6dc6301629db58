"""UpSafe°C: safety-aware upcycling (layer scan, SafetyMoE, safety temperature, save/load)."""
from .config import UpcycleConfig
from .layer import SafetyMoE
from .model import (get_upcycle_config, routing_summary, safety_moe_modules, safety_temperature,
                    set_kernel_preference, set_safety_temperature, upcycle_, upcycled_layers)

__all__ = ["UpcycleConfig", "SafetyMoE", "upcycle_", "set_safety_temperature", "safety_temperature",
           "safety_moe_modules", "routing_summary", "set_kernel_preference", "get_upcycle_config", "upcycled_layers"]
from .hf import UpsafeConfig, as_upsafe_model, upsafe_config  # noqa: E402  (registers model_type "upsafe_upcycled")

__all__ += ["UpsafeConfig", "upsafe_config", "as_upsafe_model"]
from .io import load_safety_adapter, load_upcycled, save_safety_adapter, save_upcycled  # noqa: E402

__all__ += ["save_upcycled", "load_upcycled", "save_safety_adapter", "load_safety_adapter"]
from .sequence import fit_sequence_routers, sequence_routes, sequence_scores  # noqa: E402

__all__ += ["fit_sequence_routers", "sequence_routes", "sequence_scores"]
from .scan import LayerScanReport, scan_safety_layers  # noqa: E402

__all__ += ["LayerScanReport", "scan_safety_layers"]
from .pipeline import DemoConfig, evaluate_at, plot_pareto, run_demo, sweep_temperature  # noqa: E402

__all__ += ["DemoConfig", "run_demo", "sweep_temperature", "evaluate_at", "plot_pareto"]
