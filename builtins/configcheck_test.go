package builtins

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/kuasar-io/containerd-kuasar/contrib/scratch"
)

func writeConfig(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A typo in a Kuasar plugin's section stops the daemon with an error that
// names the key, the plugin and what was meant; so does a value of the
// wrong type, and a section of a Kuasar plugin that does not exist. Other
// plugins' sections are containerd's business.
func TestCheckConfigReportsTypos(t *testing.T) {
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeConfig(t, dir, "extra.toml", `version = 3
[plugins.'io.containerd.kuasar.monitor.v1.keeper']
  keeper_paht = ""
`)
	path := writeConfig(t, dir, "config.toml", `version = 3
imports = ["`+filepath.Join(dir, "extra.toml")+`"]
[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']
  keep_module = 4
  host_idle_timeout = 5
[plugins.'io.containerd.sandbox.controller.v1.kuasar-runc']
  runtime = "runc"
  [plugins.'io.containerd.sandbox.controller.v1.kuasar-runc'.nested]
    x = 1
[plugins.'io.containerd.sandbox.controller.v1.kuasar-rnuc']
  runtime = "runc"
[plugins.'io.containerd.gc.v1.scheduler']
  not_ours = true
`)
	err := CheckConfig(context.Background(), path, true)
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	for _, want := range []string{
		"config " + path,
		`unknown key "keep_module" in [plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm'] (did you mean "keep_modules"?)`,
		`unknown key "keeper_paht" in [plugins.'io.containerd.kuasar.monitor.v1.keeper'] (did you mean "keeper_path"?)`,
		`unknown key "nested" in [plugins.'io.containerd.sandbox.controller.v1.kuasar-runc']`,
		`[plugins.'io.containerd.sandbox.controller.v1.kuasar-rnuc'] names no plugin of containerd-kuasar (did you mean "io.containerd.sandbox.controller.v1.kuasar-runc"?)`,
		`[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']: toml: cannot decode TOML integer`,
		"5 error(s)",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not say %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "not_ours") || strings.Contains(msg, "scheduler") {
		t.Errorf("error is about a stock plugin:\n%s", msg)
	}
}

// What ships and what `config default` prints pass; so does no config at
// the default path, and a config containerd itself cannot load is left to
// containerd to report.
func TestCheckConfigAccepts(t *testing.T) {
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dir := t.TempDir()
	if err := CheckConfig(ctx, "../contrib/config.toml", true); err != nil {
		t.Errorf("contrib/config.toml: %v", err)
	}
	l, err := scratch.Write(scratch.Options{Dir: filepath.Join(dir, "scratch")})
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckConfig(ctx, l.Config, true); err != nil {
		t.Errorf("scratch config: %v", err)
	}
	if err := CheckConfig(ctx, writeConfig(t, dir, "default.toml", defaultPluginConfig(t)), true); err != nil {
		t.Errorf("the defaults: %v", err)
	}
	if err := CheckConfig(ctx, filepath.Join(dir, "absent.toml"), false); err != nil {
		t.Errorf("no config file: %v", err)
	}
	if err := CheckConfig(ctx, writeConfig(t, dir, "broken.toml", "version = [\n"), true); err != nil {
		t.Errorf("a config containerd cannot parse: %v", err)
	}
}

// defaultPluginConfig renders every plugin's default config as `config
// default` does.
func defaultPluginConfig(t *testing.T) string {
	t.Helper()
	plugins := map[string]any{}
	for _, r := range registryGraph() {
		if r.Config != nil {
			plugins[r.URI()] = r.Config
		}
	}
	b, err := toml.Marshal(map[string]any{"version": 3, "plugins": plugins})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// `containerd-kuasar config default` documents every option of every
// Kuasar plugin: each has a comment, which go-toml prints above it.
func TestEveryKuasarOptionDocumented(t *testing.T) {
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range registryGraph() {
		if !IsKuasar(&r) || r.Config == nil {
			continue
		}
		n++
		for _, key := range undocumented(reflect.TypeOf(r.Config), "") {
			t.Errorf("%s: option %s has no comment", r.URI(), key)
		}
		out := dump(t, map[string]any{"plugins": map[string]any{r.URI(): r.Config}})
		lines := strings.Split(out, "\n")
		for i, l := range lines {
			l = strings.TrimSpace(l)
			if strings.Contains(l, " = ") && !strings.HasPrefix(l, "#") && (i == 0 || !strings.HasPrefix(strings.TrimSpace(lines[i-1]), "#")) {
				t.Errorf("%s: %q is printed without a comment:\n%s", r.URI(), l, out)
			}
		}
	}
	if n < 3 {
		t.Fatalf("only %d Kuasar plugins with a config", n)
	}
}

func undocumented(t reflect.Type, prefix string) []string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if !f.IsExported() || name == "-" {
			continue
		}
		if f.Tag.Get("comment") == "" {
			out = append(out, prefix+name)
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() != "time" {
			out = append(out, undocumented(ft, prefix+name+".")...)
		}
	}
	return out
}

func TestEditDistance(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		d    int
	}{{"", "", 0}, {"abc", "", 3}, {"keep_module", "keep_modules", 1}, {"keeper_paht", "keeper_path", 2}, {"kitten", "sitting", 3}} {
		if d := editDistance(tc.a, tc.b); d != tc.d {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.a, tc.b, d, tc.d)
		}
	}
	if s := suggest("runtime_path", []string{"host_path", "keeper_path"}); s != "" {
		t.Errorf("suggested %s for a word that is no typo of any", s)
	}
}
