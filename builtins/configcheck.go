package builtins

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"

	srvconfig "github.com/containerd/containerd/v2/cmd/containerd/server/config"
	"github.com/containerd/containerd/v2/version"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
)

// containerd decodes each plugin's section of the config leniently: an
// unknown key is logged as a warning ("Ignoring unknown key in TOML for
// plugin") and dropped, so a typo in a controller option silently runs the
// node on the default. CheckConfig holds the Kuasar plugins' sections to
// their keys instead, before the daemon starts.

// CheckConfig loads the daemon's config as containerd does (imports,
// migration from older versions) and returns an error naming every key of
// a Kuasar plugin's section the plugin does not know, every value of the
// wrong type there, and every Kuasar plugin section that names no plugin.
// As containerd, it reads path only if it exists or was given explicitly;
// a config containerd cannot load is left for containerd to report.
func CheckConfig(ctx context.Context, path string, explicit bool) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) && !explicit {
		return nil
	}
	regs := registry.Graph(func(*plugin.Registration) bool { return false })
	cfg := &srvconfig.Config{Version: version.ConfigVersion}
	// containerd logs what it finds while loading when it loads the file
	// itself, right after: once is enough.
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	qctx := log.WithLogger(ctx, logrus.NewEntry(quiet))
	all := func() iter.Seq[plugin.Registration] { return slices.Values(regs) }
	if err := srvconfig.LoadConfigWithPlugins(qctx, path, all, cfg); err != nil {
		return nil
	}
	errs := checkPluginSections(cfg.Plugins, regs)
	if len(errs) == 0 {
		return nil
	}
	lines := make([]string, len(errs))
	for i, e := range errs {
		lines[i] = "  " + e.Error()
	}
	return fmt.Errorf("config %s: %d error(s) in the sections of Kuasar plugins:\n%s", path, len(errs), strings.Join(lines, "\n"))
}

// checkPluginSections checks the Kuasar plugins' sections of a config's
// plugins table against the registrations.
func checkPluginSections(sections map[string]any, regs []plugin.Registration) []error {
	known := map[string]*plugin.Registration{}
	var kuasar []string
	for i := range regs {
		if IsKuasar(&regs[i]) {
			known[regs[i].URI()] = &regs[i]
			kuasar = append(kuasar, regs[i].URI())
		}
	}
	sort.Strings(kuasar)
	uris := make([]string, 0, len(sections))
	for uri := range sections {
		uris = append(uris, uri)
	}
	sort.Strings(uris)
	var errs []error
	for _, uri := range uris {
		r, ok := known[uri]
		if !ok {
			if isKuasarURI(uri) {
				errs = append(errs, fmt.Errorf("[plugins.'%s'] names no plugin of containerd-kuasar%s; its plugins: %s", uri, suggest(uri, kuasar), strings.Join(kuasar, ", ")))
			}
			continue
		}
		if r.Config == nil {
			errs = append(errs, fmt.Errorf("[plugins.'%s']: the plugin takes no configuration", uri))
			continue
		}
		errs = append(errs, checkSection(uri, sections[uri], r.Config)...)
	}
	return errs
}

// isKuasarURI reports whether a plugin URI is in containerd-kuasar's own
// namespace of plugins (see IsKuasar).
func isKuasarURI(uri string) bool {
	i := strings.LastIndexByte(uri, '.')
	if i < 0 {
		return false
	}
	return IsKuasar(&plugin.Registration{Type: plugin.Type(uri[:i]), ID: uri[i+1:]})
}

// checkSection checks one plugin's section against its config's type:
// every key must name a field (as go-toml matches them: by tag, else by
// name, regardless of case), and every value must decode into it.
func checkSection(uri string, section any, config any) []error {
	t := reflect.TypeOf(config)
	if t.Kind() != reflect.Pointer {
		return nil
	}
	var errs []error
	if m, ok := section.(map[string]any); ok {
		keys := tomlKeys(t.Elem(), "")
		for _, key := range unknownKeys(m, t.Elem(), "") {
			errs = append(errs, fmt.Errorf("unknown key %q in [plugins.'%s']%s; its keys: %s", key, uri, suggest(key, keys), strings.Join(keys, ", ")))
		}
	}
	b, err := toml.Marshal(section)
	if err == nil {
		err = toml.Unmarshal(b, reflect.New(t.Elem()).Interface())
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("[plugins.'%s']: %w", uri, err))
	}
	return errs
}

// unknownKeys lists the keys of section (dotted below prefix) that name no
// field of the struct t, looking into the tables of struct fields.
func unknownKeys(section map[string]any, t reflect.Type, prefix string) []string {
	names := make([]string, 0, len(section))
	for k := range section {
		names = append(names, k)
	}
	sort.Strings(names)
	var out []string
	for _, k := range names {
		ft, ok := fieldType(t, k)
		if !ok {
			out = append(out, prefix+k)
			continue
		}
		if sub, isTable := section[k].(map[string]any); isTable && ft.Kind() == reflect.Struct && ft.PkgPath() != "time" {
			out = append(out, unknownKeys(sub, ft, prefix+k+".")...)
		}
	}
	return out
}

// fieldType finds the field of struct t that key decodes into.
func fieldType(t reflect.Type, key string) (reflect.Type, bool) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil, false
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if !f.IsExported() || name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		if strings.EqualFold(name, key) {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			return ft, true
		}
	}
	return nil, false
}

// tomlKeys lists the keys a config struct takes, nested ones dotted.
func tomlKeys(t reflect.Type, prefix string) []string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() != "time" {
			keys = append(keys, tomlKeys(ft, prefix+name+".")...)
			continue
		}
		keys = append(keys, prefix+name)
	}
	return keys
}

// suggest returns ` (did you mean "k"?)` for the candidate closest to
// word, if one is close enough to be a typo of it.
func suggest(word string, candidates []string) string {
	best, bestD := "", len(word)/3+1
	for _, c := range candidates {
		if d := editDistance(word, c); d < bestD {
			best, bestD = c, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
