package contrib_test

import (
	"os"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// The shipped node configuration parses and declares both handlers.
func TestNodeConfig(t *testing.T) {
	b, err := os.ReadFile("config.toml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Version int `toml:"version"`
		Plugins map[string]struct {
			Containerd struct {
				Runtimes map[string]struct {
					RuntimeType string `toml:"runtime_type"`
					Sandboxer   string `toml:"sandboxer"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	rt := cfg.Plugins["io.containerd.cri.v1.runtime"].Containerd.Runtimes
	if cfg.Version != 4 || rt["kuasar-runc"].Sandboxer != "kuasar-runc" || rt["kuasar-runc"].RuntimeType != "io.containerd.kuasar.v1" || rt["runc"].Sandboxer != "podsandbox" ||
		rt["kuasar-wasm"].Sandboxer != "kuasar-wasm" || rt["kuasar-wasm"].RuntimeType != "io.containerd.kuasar.v1" ||
		rt["kuasar-vmm"].Sandboxer != "kuasar-vmm" || rt["kuasar-vmm"].RuntimeType != "io.containerd.kuasar.v1" ||
		rt["kuasar-gvisor"].Sandboxer != "kuasar-appkernel" || rt["kuasar-gvisor"].RuntimeType != "io.containerd.kuasar.v1" {
		t.Fatalf("unexpected handlers: %+v (version %d)", rt, cfg.Version)
	}
}
