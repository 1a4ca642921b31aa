package scratch

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	l, err := Write(Options{Dir: dir, Mirror: "127.0.0.1:5000", DefaultHandler: "kuasar-runc"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(l.Config)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := toml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("config is not valid TOML: %v\n%s", err, b)
	}
	if cfg["root"] != filepath.Join(dir, "root") {
		t.Fatalf("root = %v", cfg["root"])
	}
	if !strings.Contains(string(b), `default_runtime_name = "kuasar-runc"`) {
		t.Fatal("default handler not set")
	}
	hosts, err := os.ReadFile(filepath.Join(dir, "certs.d", "registry.k8s.io", "hosts.toml"))
	if err != nil || !strings.Contains(string(hosts), "http://127.0.0.1:5000") {
		t.Fatalf("mirror not written: %s %v", hosts, err)
	}
}

func TestWritePortMap(t *testing.T) {
	for _, pm := range []bool{false, true} {
		dir := t.TempDir()
		if _, err := Write(Options{Dir: dir, PortMap: pm}); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, "cni/net.d/10-kuasar.conflist"))
		var conf struct {
			Plugins []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(b, &conf); err != nil {
			t.Fatalf("conflist is not JSON: %v\n%s", err, b)
		}
		if got := len(conf.Plugins) == 2 && conf.Plugins[1].Type == "portmap"; got != pm {
			t.Fatalf("portmap=%v: plugins %+v", pm, conf.Plugins)
		}
	}
}

func TestWriteRejects(t *testing.T) {
	tests := []struct {
		name string
		o    Options
	}{
		{"relative", Options{Dir: "rel/dir"}},
		{"too long", Options{Dir: "/" + strings.Repeat("x", 100)}},
		{"bad subnet", Options{Dir: t.TempDir(), Subnet: "10.0.0.0/99"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Write(tt.o); err == nil {
				t.Fatal("expected an error")
			}
		})
	}
}
