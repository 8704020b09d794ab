from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.shortcuts import redirect
from django.templatetags.static import static
from django.urls import include, path


@login_not_required
def favicon(request):
    """Browsers that ask for /favicon.ico before reading the page's icon link get the site's SVG icon."""
    return redirect(static("favicon.svg"), permanent=True)


urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("favicon.ico", favicon),
    path("admin/", admin.site.urls),
    path("api/", include("api.urls")),
    path("", include("experiments.urls")),
]
