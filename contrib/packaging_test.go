package contrib_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// unitKeys reads the [Service] and [Unit] settings of a systemd unit file
// (the last value of a key wins, as for systemd's scalar settings).
func unitKeys(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: not a setting: %q", path, line)
			}
			keys[section+"."+k] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return keys
}

// The shipped unit runs the daemon as the node's containerd.service would,
// with what a restart or an upgrade under running pods needs. The package
// test runs systemd-analyze verify on the installed copy.
func TestSystemdUnit(t *testing.T) {
	keys := unitKeys(t, "systemd/containerd.service")
	for k, want := range map[string]string{
		"Service.ExecStart":      "@BINDIR@/containerd",
		"Service.Type":           "notify",
		"Service.Delegate":       "yes",
		"Service.KillMode":       "process",
		"Service.OOMScoreAdjust": "-999",
		"Service.LimitNOFILE":    "1024:524288",
		"Service.Restart":        "always",
		"Unit.Wants":             "network-online.target",
		"Install.WantedBy":       "multi-user.target",
	} {
		if got := keys[k]; got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if !strings.Contains(keys["Unit.After"], "network-online.target") {
		t.Errorf("After = %q: the unit must start after network-online.target", keys["Unit.After"])
	}
}

// goModVersion is the version go.mod requires of a module.
func goModVersion(t *testing.T, module string) string {
	t.Helper()
	b, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(module) + `\s+v(\S+)`).FindStringSubmatch(string(b))
	if m == nil {
		t.Fatalf("go.mod does not require %s", module)
	}
	return m[1]
}

// The spec names the containerd release the binaries are built from (its
// Provides and Obsoletes depend on it) and the version RELEASES.md is at.
func TestRPMSpecVersions(t *testing.T) {
	b, err := os.ReadFile("rpm/containerd-kuasar.spec")
	if err != nil {
		t.Fatal(err)
	}
	spec := string(b)
	field := func(re string) string {
		m := regexp.MustCompile(`(?m)` + re).FindStringSubmatch(spec)
		if m == nil {
			t.Fatalf("the spec has no %s", re)
		}
		return m[1]
	}
	if got, want := field(`^%global containerd_version (\S+)$`), goModVersion(t, "github.com/containerd/containerd/v2"); got != want {
		t.Errorf("spec containerd_version %s, go.mod has containerd %s", got, want)
	}
	version := field(`^Version:\s+(\S+)$`)
	rel, err := os.ReadFile("../RELEASES.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^## v(\S+)`).FindStringSubmatch(string(rel))
	if m == nil || m[1] != version {
		t.Errorf("spec Version %s, the newest release in RELEASES.md is %v", version, m)
	}
	if !strings.Contains(spec, "- "+version+"-1\n") {
		t.Errorf("the spec's %%changelog has no entry for %s-1", version)
	}
}

// NOTICE passes on the notice of every module, compiled into a shipped
// binary, that carries one (Apache-2.0 section 4(d)).
func TestNoticeCoversModules(t *testing.T) {
	notice, err := os.ReadFile("../NOTICE")
	if err != nil {
		t.Fatal(err)
	}
	// The packages of every binary make install ships.
	cmd := exec.Command("go", "list", "-deps", "-tags", "no_btrfs",
		"-f", "{{with .Module}}{{.Path}}\t{{.Dir}}{{end}}",
		"./cmd/containerd-kuasar", "./cmd/containerd-shim-kuasar-v1", "./cmd/kuasar-keeper",
		"./cmd/kuasar-wasm-host", "./cmd/kuasar-vmm-agent",
		"github.com/containerd/containerd/v2/cmd/ctr",
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
		"github.com/containerd/containerd/v2/cmd/containerd-stress")
	cmd.Dir = ".."
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	seen := map[string]bool{}
	checked := 0
	for _, line := range strings.Split(string(out), "\n") {
		path, dir, ok := strings.Cut(line, "\t")
		if !ok || seen[path] || dir == "" {
			continue
		}
		seen[path] = true
		for _, name := range []string{"NOTICE", "NOTICE.txt", "NOTICE.md"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				checked++
				if path != "github.com/kuasar-io/containerd-kuasar" && !strings.Contains(string(notice), path) {
					t.Errorf("%s has a %s that NOTICE does not pass on", path, name)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatalf("no module with a NOTICE among %d: go list found nothing to check", len(seen))
	}
	t.Logf("%d modules, %d with a NOTICE", len(seen), checked)
}
