"""Running a suite: suites, options, the plan, the cost estimate, workers, executors and
the driver."""
