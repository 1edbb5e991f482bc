"""tfrs.tasks-style loss layers."""

from tfrec_fast.tasks.next_item import NextItemTask
