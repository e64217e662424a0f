"""The SMS cap across a patient's bookings when the patient has more bookings at the clinic
than the cap reads (Store.CAPS_OTHERS_MAX): it must read the ones that can share a day or a
week with the new booking's SMS, not the ones that expire first (review). Real Redis.

The read took the ones expiring first: a patient with an earlier series of 51 visits still
kept had a new visit capped against those alone, and got two SMS a day (its and LATER's)."""

from __future__ import annotations

from tests.test_store_caps import NOW, doc_of, planned, sms_days, store, within_caps  # noqa: F401
from worker.store import Store


def test_a_patient_with_many_bookings_still_gets_one_sms_a_day(store, catalog,  # noqa: F811
                                                               booking_doc):
    later = store.upsert(*planned(catalog, doc_of(booking_doc, "LATER", days=60)), NOW)
    assert sms_days(later)
    # More earlier visits of the same patient than the cap reads (an earlier series, kept
    # for the retention after their last reminder): none shares a week with LATER's SMS.
    earlier = [store.upsert(*planned(catalog, doc_of(booking_doc, f"E-{n}")), NOW)
               for n in range(Store.CAPS_OTHERS_MAX + 1)]
    # Another visit on LATER's day: every SMS day of it is taken by LATER.
    again = store.upsert(*planned(catalog, doc_of(booking_doc, "AGAIN", days=60)), NOW)
    assert set(sms_days(again)).isdisjoint(sms_days(later)), (sms_days(again),
                                                              sms_days(later))
    assert within_caps(sms_days(later, again, *earlier))

