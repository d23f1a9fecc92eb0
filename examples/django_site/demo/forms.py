from django import forms


class NameForm(forms.Form):
    name = forms.CharField(max_length=100)


class UploadForm(forms.Form):
    file = forms.FileField()
