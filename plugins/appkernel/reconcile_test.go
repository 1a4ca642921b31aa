package appkernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// What a killed runsc create leaves in runsc's root goes at reconcile,
// whatever it belongs to, and nothing of what a record owns does.
func TestRemoveStrayFiles(t *testing.T) {
	root := t.TempDir()
	k := &kind{root: root}
	files := map[string]bool{ // name: kept
		"runsc-sb1.sock":           true,  // an owned sandbox's control socket
		"runsc-gone.sock":          false, // a sandbox no record owns
		"sb1_sandbox:sb1.lock":     true,  // the owned root container
		"c1_sandbox:sb1.lock":      true,  // an owned container
		"c2_sandbox:sb1.lock":      false, // a subcontainer whose create was killed, in a sandbox that lives on
		"gone_sandbox:gone.lock":   false,
		"unrelated.txt":            true,
		"c9_sandbox:other.lockish": true,
	}
	for name := range files {
		if err := os.WriteFile(filepath.Join(root, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	err := k.removeStrayFiles(context.Background(), map[string]bool{"sb1": true}, map[string]bool{"sb1": true, "c1": true})
	if err != nil {
		t.Fatal(err)
	}
	for name, kept := range files {
		_, err := os.Stat(filepath.Join(root, name))
		if got := err == nil; got != kept {
			t.Errorf("%s: kept %v, want %v", name, got, kept)
		}
	}
}
