"""Configuration and run plumbing, used by every stage: the recipe schema, its rules and loading, Make's stamps,
every path, atomic file writes, what each artifact says about itself, the step scripts' command line and logging,
and how several processes are launched. It hands a validated, frozen recipe (`config.load`) and the run's paths to
every other stage, and imports none of them (only the task registry, whose tasks declare their own settings)."""
