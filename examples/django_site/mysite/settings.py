"""Settings for the wfastcgi Django example: no database, no sessions."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# Set DJANGO_SECRET_KEY (e.g. as an appSetting in web.config) in production.
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "django-insecure-dev-only-do-not-use-in-production"
)
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
# Fine for an example; list the real host names in production.
ALLOWED_HOSTS = ["*"]

# No auth, admin or sessions, so the site needs no database or migrations.
INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Cookie-based CSRF: the token lives in the csrftoken cookie.
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
            ],
        },
    },
]

DATABASES = {}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Relative, so Django prefixes SCRIPT_NAME when the site is not at the root.
# `manage.py collectstatic` fills STATIC_ROOT; IIS serves it (see web.config).
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "static"

# Send request errors to stderr even when DEBUG is off, so they reach the
# gateway's log instead of being mailed to (absent) ADMINS.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
