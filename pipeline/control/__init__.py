"""Run control: the one place that runs the graph (`runner`), with everything that acts on a process or a run as
a whole — signals, the stop request, sweeping what killed writers left, the exit code, the no-op index.

Nothing else installs handlers, exits the process or deletes files on its own: task checks (`complete()`,
`exists()`), task constructors and the read-only commands only read.
"""
