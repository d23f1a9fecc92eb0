"""Loads a bench app for the peers that have no web.config reader of their own (flup, uWSGI),
following the same rules as wfastcgi.py and the gateway: chdir to the app folder, put it first on
sys.path, copy every appSetting into os.environ, add PYTHONPATH entries (relative ones against the
app folder), then resolve WSGI_HANDLER (`module.attr`, with `name()` calls).
"""

import importlib
import os
import sys
import xml.etree.ElementTree as ElementTree


def app_settings(app_dir):
    for name in os.listdir(app_dir):
        if name.lower() == "web.config":
            section = ElementTree.parse(os.path.join(app_dir, name)).getroot().find("appSettings")
            if section is None:
                return {}
            return {
                add.get("key").strip(): add.get("value", "")
                for add in section.findall("add")
                if add.get("key")
            }
    return {}


def resolve(handler):
    """`a.b.c().d`: import the longest importable module prefix, then walk the rest."""
    parts = handler.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            call = part.endswith("()")
            target = getattr(target, part[:-2] if call else part)
            if call:
                target = target()
        return target
    raise ImportError("cannot import %r" % handler)


def load(app_dir):
    app_dir = os.path.abspath(app_dir)
    os.chdir(app_dir)
    sys.path.insert(0, app_dir)
    settings = app_settings(app_dir)
    os.environ.update(settings)
    for entry in settings.get("PYTHONPATH", "").replace(";", os.pathsep).split(os.pathsep):
        if entry:
            sys.path.append(os.path.join(app_dir, os.path.expandvars(entry)))
    return resolve(settings["WSGI_HANDLER"])
