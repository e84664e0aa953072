"""The names the samplers, timestep spacings, beta schedules, prediction targets and objectives go by.

Kept free of torch so that the command line's `--help` and the params schema can list them without loading
the numerical code; `samplers.py` and `schedule.py` implement exactly these.
"""

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "heun", "dpmpp_2m")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
KARRAS_SAMPLERS: tuple[str, ...] = ("euler", "heun", "dpmpp_2m")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
# What a UNet learns: to reverse a DDPM's noising (`NoiseSchedule`, by PREDICTION_TYPES), or the velocity of a
# rectified flow (`FlowSchedule`), which the FLOW_SAMPLERS integrate.
OBJECTIVES: tuple[str, ...] = ("diffusion", "flow")
FLOW_SAMPLERS: tuple[str, ...] = ("euler", "heun")
