from django import forms


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, initial="CLI", help_text="What the token is for, e.g. 'laptop CLI' or 'CI'.")
