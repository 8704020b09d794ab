from django import forms

from experiments.selectors import teams

from .models import ApiToken

# The expiries the token page offers, in days ("" : never).
EXPIRY_CHOICES = [
    ("", "never"),
    ("1", "in 1 day"),
    ("7", "in 7 days"),
    ("30", "in 30 days"),
    ("90", "in 90 days"),
    ("365", "in 1 year"),
]


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        max_length=100, initial="CLI", help_text="What the token is for, e.g. 'laptop CLI' or 'CI'."
    )
    expires_in_days = forms.TypedChoiceField(
        label="Expires",
        choices=EXPIRY_CHOICES,
        coerce=int,
        empty_value=None,
        required=False,
        initial="90",
        help_text="From then on the token is refused (401).",
    )
    # Left out (a script posting only a name): read and write, never expires, all the user's teams.
    scope = forms.TypedChoiceField(
        choices=ApiToken.Scope.choices,
        initial=ApiToken.Scope.WRITE,
        widget=forms.RadioSelect,
        required=False,
        empty_value=ApiToken.Scope.WRITE,
        help_text="A read-only token may only read: anything else answers 403.",
    )
    team = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="all my teams",
        help_text="A token for one team sees and creates only that team's records.",
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams.team_list(user=user).order_by("name")
