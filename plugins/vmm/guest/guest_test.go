package guest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestModules(t *testing.T) {
	ms := []Module{{Path: "6.1/kernel/virtio.ko", Early: true}, {Path: "6.1/kernel/9p.ko"}}
	got, err := ParseModules(FormatModules(ms))
	if err != nil || !reflect.DeepEqual(got, ms) {
		t.Fatalf("round trip: %v %v", got, err)
	}
	for _, bad := range []string{"early", "soon x.ko", "late ../../etc/shadow"} {
		if _, err := ParseModules([]byte(bad + "\n")); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParams(t *testing.T) {
	got := Params("console=ttyS0 kuasar.log=debug quiet kuasar.debug kuasar.channel=serial")
	want := map[string]string{"kuasar.log": "debug", "kuasar.debug": "", "kuasar.channel": "serial"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Params = %v", got)
	}
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir); err == nil {
		t.Fatal("empty directory opened")
	}
	b, _ := json.Marshal(Manifest{Key: "k1", KernelRelease: "6.1"})
	os.WriteFile(filepath.Join(dir, ManifestFile), b, 0o644)
	if _, err := Open(dir); err == nil {
		t.Fatal("image without its files opened")
	}
	os.WriteFile(filepath.Join(dir, KernelFile), nil, 0o644)
	os.WriteFile(filepath.Join(dir, InitrdFile), nil, 0o644)
	img, err := Open(dir)
	if err != nil || img.Key != "k1" || img.Kernel != filepath.Join(dir, KernelFile) {
		t.Fatalf("Open = %+v, %v", img, err)
	}
}
