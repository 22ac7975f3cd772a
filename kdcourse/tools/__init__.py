"""Instructor and CI tooling, on top of the course (nothing in the labs imports it).

* :mod:`.nbio` — notebook I/O (read/write/source/strip);
* :mod:`.notebooks` — execute a notebook (papermill / nbclient), cell timings;
* :mod:`.report` — the course report (every solution run, figures and timings);
* lab generation is :mod:`kdcourse.labgen`, grading :mod:`kdcourse.grading`,
  the figure benchmarks :mod:`kdcourse.benchmarks`.
"""
