from django.urls import path

from demo import views

urlpatterns = [
    path("", views.index, name="index"),
    path("form/", views.name_form, name="form"),
    path("upload/", views.upload, name="upload"),
    path("api/info/", views.api_info, name="api-info"),
    path("stream/", views.stream, name="stream"),
    path("async/info/", views.async_info, name="async-info"),
    path("async/stream/", views.async_stream, name="async-stream"),
    path("boom/", views.boom, name="boom"),
]

# 404 uses Django's default view with demo/templates/404.html.
handler500 = "demo.views.server_error"
