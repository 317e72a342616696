"""scripts/gap_chat.py's scorer: keys given their own number, in the two shapes the model answers in."""

from gap_chat import kept

FACTS = {"marble": "8922960", "copper": "7368886", "violin": "4522457"}


def test_a_key_takes_the_first_number_after_it():
    assert kept("- Marble: 8922960\n- Copper: 7368886\n- Violin: 4522457", FACTS) == 3
    assert kept("- Marble: 7368886\n- Copper: 8922960\n- Violin: 4522457", FACTS) == 1  # two swapped
    assert kept("- Marble: 8922960\n- Violin: 4522457", FACTS) == 2  # one key left out
    assert kept("- Marble: 89229601\n- Copper: 7368886", FACTS) == 1  # eight digits are not the number


def test_a_list_of_keys_then_numbers_pairs_them_in_order():
    answer = "The numbers for marble, copper, and violin are 8922960, 4522457, and 4522457 respectively."
    assert kept(answer, FACTS) == 2
    assert kept("The numbers for marble, copper, and violin are 1, 2, and 3.", FACTS) == 0
    assert kept("I do not know.", FACTS) == 0
