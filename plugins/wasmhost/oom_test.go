package wasmhost

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestSetOOMScoreAdj(t *testing.T) {
	tests := []struct {
		value   int
		want    string
		invalid bool
	}{
		{value: 0, want: "0"},
		{value: 500, want: "500"},
		{value: -1000, want: "-1000"},
		{value: 1001, invalid: true},
		{value: -1001, invalid: true},
	}
	for _, tt := range tests {
		file := filepath.Join(t.TempDir(), "oom_score_adj")
		if err := os.WriteFile(file, []byte("-999"), 0o644); err != nil {
			t.Fatal(err)
		}
		err := setOOMScoreAdj(file, tt.value)
		if tt.invalid {
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("%d: %v, want invalid argument", tt.value, err)
			}
			continue
		}
		b, _ := os.ReadFile(file)
		if err != nil || strings.TrimSpace(string(b)) != tt.want {
			t.Errorf("%d: %v, file holds %q", tt.value, err, b)
		}
	}
}
