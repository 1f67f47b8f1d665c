"""JupyterLab for the course: a student's lab shows a student's tools, an instructor's lab
nbgrader's, and one Ctrl-C stops either the way Jupyter stops itself.

nbgrader puts its instructor tools into every JupyterLab it is installed with: the
Formgrader, Create Assignment, the course and assignment lists (which need an nbgrader
exchange this course does not use) and a menu that opens them. Its documentation (user
guide, "Installation", section "Disabling extensions") turns them off per lab extension and
server extension; the student lab does that, and keeps Validate. The instructor's lab has
Formgrader only where it opens an autograded course (:mod:`helpers.course.formgrader`):
elsewhere nbgrader's formgrader would make a gradebook of its own in the folder served.
Both labs turn off JupyterLab's "news" pop-up.

These settings go into a configuration folder of this lab's own, put first on
``JUPYTER_CONFIG_PATH`` for this server only: the user's and the environment's Jupyter
settings are left as they are.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from pathlib import Path

import nbformat
from jupyter_server.serverapp import ServerApp
from jupyterlab.labapp import LabApp

NEWS_PLUGIN = "@jupyterlab/apputils-extension:announcements"
FORMGRADER_PLUGIN = "@jupyter/nbgrader:formgrader"
FORMGRADER_EXTENSION = "nbgrader.server_extensions.formgrader"
INSTRUCTOR_PLUGINS = (FORMGRADER_PLUGIN, "@jupyter/nbgrader:create-assignment",
                      "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:assignment-list",
                      "@jupyter/nbgrader:menu")  # the Nbgrader menu opens the first three
INSTRUCTOR_SERVER_EXTENSIONS = (FORMGRADER_EXTENSION,
                                "nbgrader.server_extensions.course_list",
                                "nbgrader.server_extensions.assignment_list")


def copy_notebook(source: Path, target: Path) -> None:
    """Copy a student notebook, with the ``language_info`` that this environment's kernel
    reports. JupyterLab writes the kernel's into the notebook as soon as the kernel starts;
    with the released notebook's (which cannot know the student's Python version) a lesson
    opened for the first time would already be marked unsaved."""
    from ipykernel.ipkernel import IPythonKernel

    notebook = nbformat.read(source, as_version=4)
    notebook.metadata["language_info"] = dict(IPythonKernel.language_info)
    nbformat.write(notebook, target)


def write_config(folder: Path, instructor: bool, formgrader: bool | None = None) -> None:
    """Write the lab's Jupyter configuration into ``folder`` (a Jupyter config directory).
    ``formgrader``: the instructor's lab with Formgrader (default: whenever ``instructor``)."""
    formgrader = instructor and formgrader is not False
    disabled = [NEWS_PLUGIN] + ([] if instructor else list(INSTRUCTOR_PLUGINS)) \
        + ([] if formgrader else [FORMGRADER_PLUGIN])
    (folder / "labconfig").mkdir(parents=True, exist_ok=True)
    (folder / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {plugin: True for plugin in disabled}}, indent=1))
    extensions = {name: instructor for name in INSTRUCTOR_SERVER_EXTENSIONS}
    extensions[FORMGRADER_EXTENSION] = formgrader
    (folder / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": extensions}}, indent=1))


class CourseServerApp(ServerApp):
    """Jupyter's server, stopped by the first SIGINT (Ctrl-C) with Jupyter's own shutdown:
    kernels shut down and its ``jpserver-*.json`` files removed, terminal or not.

    Plain ``jupyter lab`` asks "Shut down this Jupyter server (y/[n])?" in a terminal, and
    without one lets the ``KeyboardInterrupt`` end the loop without that cleanup. SIGINT here
    does what SIGTERM does (JupyterHub makes the same choice for its servers).
    """

    def init_signal(self) -> None:
        super().init_signal()
        signal.signal(signal.SIGINT, self._signal_stop)
        self.log.addFilter(_one_ctrl_c)


def _one_ctrl_c(record: logging.LogRecord) -> bool:
    """Jupyter's start-up line promises a confirmation that :class:`CourseServerApp` does not
    ask for ("twice to skip confirmation"): say what one Ctrl-C does instead."""
    if "twice to skip confirmation" in str(record.msg):
        record.msg, record.args = "Use Control-C to stop this server and shut down all kernels.", ()
    return True


class CourseLabApp(LabApp):
    """JupyterLab on a :class:`CourseServerApp`; still the ``jupyterlab`` server extension
    (Jupyter would otherwise look for one in the package this class is defined in)."""

    serverapp_class = CourseServerApp

    @classmethod
    def get_extension_package(cls) -> str:
        return LabApp.get_extension_package()

    @classmethod
    def get_extension_point(cls) -> str:
        return LabApp.get_extension_point()


def run_lab(jupyter_args: list[str], instructor: bool = False, formgrader: bool | None = None) -> int:
    """Run JupyterLab in this process with the student's (or instructor's) configuration,
    until it is stopped; returns its exit status. Formgrader finds its course through the
    ``nbgrader_config.py`` of the working directory."""
    with tempfile.TemporaryDirectory(prefix="attention-course-lab-") as folder:
        write_config(Path(folder), instructor, formgrader)
        others = os.environ.get("JUPYTER_CONFIG_PATH")
        os.environ["JUPYTER_CONFIG_PATH"] = os.pathsep.join([folder] + ([others] if others else []))
        try:
            CourseLabApp.launch_instance(jupyter_args)
        except SystemExit as stopped:  # Jupyter exits this way when it cannot start
            return stopped.code if isinstance(stopped.code, int) else 1
        finally:
            if others is None:
                del os.environ["JUPYTER_CONFIG_PATH"]
            else:
                os.environ["JUPYTER_CONFIG_PATH"] = others
    return 0
