"""Teachers behind one interface (base.Teacher): local (local.py), served (served.py), Ray-hosted
(opd/scale/ray_workers.py); the pool routes rows to them by task tag."""

from opd.teachers.base import Teacher
from opd.teachers.local import LocalTeacher
from opd.teachers.pool import TeacherPool, load_teachers
from opd.teachers.served import ServedTeacher

__all__ = ["LocalTeacher", "ServedTeacher", "Teacher", "TeacherPool", "load_teachers"]
