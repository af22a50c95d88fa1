"""course_utils: the small library behind the deep generative models course.

One module per topic; notebooks import what they need, e.g.::

    from course_utils.runtime import get_device, budget, by_budget
    from course_utils.data import mnist
"""

__version__ = "0.1.0"
