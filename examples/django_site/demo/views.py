import asyncio
import hashlib

from django.http import (HttpResponseServerError, JsonResponse,
                         StreamingHttpResponse)
from django.shortcuts import render
from django.template import loader

from .forms import NameForm, UploadForm


def index(request):
    return render(request, "demo/index.html", {
        "title": "wfastcgi Django example",
        "script_name": request.META.get("SCRIPT_NAME", ""),
    })


def name_form(request):
    form = NameForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        return render(request, "demo/hello.html",
                      {"name": form.cleaned_data["name"]})
    status = 400 if request.method == "POST" else 200
    return render(request, "demo/form.html", {"form": form}, status=status)


def upload(request):
    if request.method == "POST":
        form = UploadForm(request.POST, request.FILES)
        if form.is_valid():
            uploaded = form.cleaned_data["file"]
            # chunks() keeps memory flat even for files spooled to disk.
            digest = hashlib.sha256()
            for chunk in uploaded.chunks():
                digest.update(chunk)
            return JsonResponse({
                "name": uploaded.name,
                "size": uploaded.size,
                "sha256": digest.hexdigest(),
            })
        return render(request, "demo/upload.html", {"form": form},
                      status=400)
    return render(request, "demo/upload.html", {"form": UploadForm()})


def api_info(request):
    return JsonResponse({
        "method": request.method,
        "path": request.path,
        "script_name": request.META.get("SCRIPT_NAME", ""),
        "query": {key: values for key, values in request.GET.lists()},
        "server_software": request.META.get("SERVER_SOFTWARE"),
    })


def stream(request):
    # A generator body lets the gateway send lines as they are produced.
    lines = (f"line {n}\n" for n in range(1, 101))
    return StreamingHttpResponse(lines, content_type="text/plain")


async def async_info(request):
    # Under ASGI this runs on the event loop itself; under WSGI Django runs it
    # in a loop of its own per request.
    await asyncio.sleep(0)
    return JsonResponse({
        "async": True,
        "path": request.path,
        "query": {key: values for key, values in request.GET.lists()},
    })


async def async_stream(request):
    async def lines():
        for n in range(1, 101):
            # Yields to the loop between lines, so other requests run.
            await asyncio.sleep(0)
            yield f"line {n}\n"
    # Django's ASGI handler sends each line as produced; its WSGI handler
    # consumes the async iterator in one go (with a warning).
    return StreamingHttpResponse(lines(), content_type="text/plain")


def boom(request):
    raise RuntimeError("boom: deliberate error to show the 500 page")


def server_error(request):
    # No request context, like Django's default: the error may lie there.
    return HttpResponseServerError(loader.render_to_string("500.html"))
