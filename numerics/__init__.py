"""Array math shared by training (torch) and serving (numpy): ODE solvers, probability-flow
likelihood, VP noise schedules and diffusion samplers. No I/O, no model classes; imports
neither ``training`` nor ``service``, and never imports torch itself."""

__all__: list[str] = []
