"""ComfyUI's V3 dynamic inputs (`io.MatchType`, `io.Autogrow`, `io.DynamicCombo`) for packs, re-exported by io.py.

ComfyUI's V3 types whose inputs the front end grows or switches. The prompt names each grown or switched input
"<group>.<name>" (API format), so each is declared here as one V1 input of that name: an Autogrow as one optional
input per possible slot (required up to `min`), a DynamicCombo as its combo plus every option's inputs (optional;
the chosen option's required ones are checked when the node runs). `execute` gets ComfyUI's values: the Autogrow
group as {slot name: value} of the slots given, the DynamicCombo as {combo id: chosen key, input id: value} of the
chosen option's inputs. A MatchType input or output is a "*" socket to our validation (as ComfyUI's backend treats
COMFY_MATCHTYPE_V3: the front end keeps a template's sockets of one type).
"""

from __future__ import annotations

from typing import Any

from comfy_compat.comfy_api.latest.io import AnyType, Combo, Input, Output

MATCHTYPE, AUTOGROW, DYNAMICCOMBO = "COMFY_MATCHTYPE_V3", "COMFY_AUTOGROW_V3", "COMFY_DYNAMICCOMBO_V3"


class DynamicInput(Input):
    """An input that stands for several V1 inputs named "<id>.<name>"."""

    def expand(self) -> list[tuple[str, bool, tuple[str, dict[str, Any]]]]:
        raise NotImplementedError

    def collect(self, kwargs: dict[str, Any]) -> None:
        """Replace this input's "<id>.<name>" values in `kwargs` by the value `execute` takes under `id`."""
        raise NotImplementedError

    def _take(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        prefix = self.id + "."
        return {key[len(prefix):]: kwargs.pop(key) for key in list(kwargs) if key.startswith(prefix)}


class _MatchTemplate:
    def __init__(self, template_id: str, allowed_types: Any = None) -> None:
        self.template_id = template_id
        if allowed_types is None:
            allowed_types = AnyType
        kinds = allowed_types if isinstance(allowed_types, list | tuple) else [allowed_types]
        self.allowed_types = ",".join(getattr(k, "io_type", k) for k in kinds)


class _MatchInput(Input):
    io_type = MATCHTYPE

    def __init__(self, id: str, template: _MatchTemplate, **options: Any) -> None:
        super().__init__(id, **options)
        self.template = template

    def v1_spec(self) -> tuple[str, dict[str, Any]]:
        kind, config = super().v1_spec()
        return kind, {"template": {"template_id": self.template.template_id,
                                   "allowed_types": self.template.allowed_types}, **config}


class _MatchOutput(Output):
    io_type = "*"  # ComfyUI's object_info says COMFY_MATCHTYPE_V3; to our validation the output is a wildcard

    def __init__(self, template: _MatchTemplate | None = None, id: str | None = None,
                 display_name: str | None = None, tooltip: str | None = None, is_output_list: bool = False) -> None:
        super().__init__(id, display_name, tooltip, is_output_list)
        self.template = template


class MatchType:
    """Sockets that take one type per node: `Template(id, allowed_types)`, `Input(id, template=...)`,
    `Output(template=...)`."""

    io_type = MATCHTYPE
    Template = _MatchTemplate
    Input = _MatchInput
    Output = _MatchOutput
    Type = Any


class _TemplatePrefix:
    def __init__(self, input: Input, prefix: str, min: int = 1, max: int = 10) -> None:
        self.input, self.prefix, self.min, self.max = input, prefix, int(min), int(max)
        self.names = [f"{prefix}{i}" for i in range(self.max)]

    def wire(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "min": self.min, "max": self.max}


class _TemplateNames:
    def __init__(self, input: Input, names: list[str], min: int = 1) -> None:
        self.input, self.names, self.min = input, list(names), int(min)

    def wire(self) -> dict[str, Any]:
        return {"names": list(self.names), "min": self.min}


class _AutogrowInput(DynamicInput):
    io_type = AUTOGROW

    def __init__(self, id: str, template: _TemplatePrefix | _TemplateNames, **options: Any) -> None:
        super().__init__(id, **options)
        if not isinstance(template, _TemplatePrefix | _TemplateNames):
            raise TypeError(f"Autogrow.Input '{id}': template must be Autogrow.TemplatePrefix or TemplateNames")
        self.template = template

    def expand(self) -> list[tuple[str, bool, tuple[str, dict[str, Any]]]]:
        kind, config = self.template.input.v1_spec()
        slot_optional = self.optional or self.template.input.optional
        return [(f"{self.id}.{name}", slot_optional or i >= self.template.min, (kind, dict(config)))
                for i, name in enumerate(self.template.names)]

    def collect(self, kwargs: dict[str, Any]) -> None:
        given = self._take(kwargs)
        kwargs[self.id] = {name: given[name] for name in self.template.names if name in given}


class Autogrow:
    """A group of inputs that grows as the user connects them: `Input(id, template=TemplatePrefix(input, prefix,
    min, max) | TemplateNames(input, names, min))`."""

    io_type = AUTOGROW
    TemplatePrefix = _TemplatePrefix
    TemplateNames = _TemplateNames
    Input = _AutogrowInput
    Type = dict


class _ComboOption:
    def __init__(self, key: str, inputs: list[Input]) -> None:
        self.key, self.inputs = key, list(inputs)


class _DynamicComboInput(DynamicInput):
    io_type = DYNAMICCOMBO

    def __init__(self, id: str, options: list[_ComboOption], **kwargs: Any) -> None:
        super().__init__(id, **kwargs)
        if not options or not all(isinstance(o, _ComboOption) for o in options):
            raise TypeError(f"DynamicCombo.Input '{id}': options must be a non-empty list of DynamicCombo.Option")
        self.choices = list(options)

    def expand(self) -> list[tuple[str, bool, tuple[str, dict[str, Any]]]]:
        combo = Combo.Input(self.id, options=[o.key for o in self.choices], default=self.choices[0].key,
                            tooltip=self.options.get("tooltip"))
        entries = [(self.id, self.optional, combo.v1_spec())]
        seen = {self.id}
        for option in self.choices:
            for item in option.inputs:
                name = f"{self.id}.{item.id}"
                if name not in seen:
                    seen.add(name)
                    entries.append((name, True, item.v1_spec()))
        return entries

    def collect(self, kwargs: dict[str, Any]) -> None:
        given = self._take(kwargs)
        chosen_key = kwargs.get(self.id, self.choices[0].key)
        chosen = next((o for o in self.choices if o.key == chosen_key), None)
        if chosen is None:
            raise ValueError(f"DynamicCombo '{self.id}': {chosen_key!r} is not one of "
                             f"{[o.key for o in self.choices]}")
        value: dict[str, Any] = {self.id: chosen_key}
        for item in chosen.inputs:
            if item.id in given:
                value[item.id] = given[item.id]
            elif not item.optional:
                raise ValueError(f"DynamicCombo '{self.id}' option {chosen_key!r} needs its input "
                                 f"'{self.id}.{item.id}'")
        kwargs[self.id] = value


class DynamicCombo:
    """A combo whose chosen option brings its own inputs: `Input(id, options=[Option(key, [inputs...]), ...])`."""

    io_type = DYNAMICCOMBO
    Option = _ComboOption
    Input = _DynamicComboInput
    Type = dict
